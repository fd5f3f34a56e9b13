// The Zero schema and read permissions of the benchmark table (bench/peers/run.sh deploys them
// with `zero-deploy-permissions --schema-path schema.js`). Same columns as pg_sync's table.
import {ANYONE_CAN, createSchema, definePermissions, number, string, table} from '@rocicorp/zero';

const events = table('events_zero')
  .columns({id: number(), grp: string(), ts: number()})
  .primaryKey('id');

export const schema = createSchema({tables: [events]});

export const permissions = definePermissions(schema, () => ({
  events_zero: {row: {select: ANYONE_CAN}},
}));
