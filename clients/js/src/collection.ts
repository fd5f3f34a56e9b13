// TanStack DB collection options for a pg_sync model: reads through Electric's Shape API
// (`GET /v1/shape`, via @tanstack/electric-db-collection) and writes through `POST
// /sync/mutate`, returning the applying txid so the optimistic state is kept until the
// write comes back through the shape.

import { electricCollectionOptions } from '@tanstack/electric-db-collection'
import type {
  ElectricCollectionConfig,
  ElectricCollectionUtils,
} from '@tanstack/electric-db-collection'
import type { CollectionConfig } from '@tanstack/db'
import type { Row, ShapeStreamOptions } from '@electric-sql/client'
import {
  clientTxIdFor,
  opFor,
  postTransaction,
  type PgSyncConnection,
  type PgSyncModel,
  type PgSyncTxResult,
} from './mutate'
import { pgSyncParser } from './parser'

/** What an Electric collection handler returns (the package does not export its name). */
export type MatchingStrategy = { txid: number | Array<number>; timeout?: number } | void

/** How long a write's optimistic state waits for its change to come back (ms). */
export const DEFAULT_TXID_TIMEOUT = 10_000

export interface PgSyncCollectionConfig<T extends Row<unknown>>
  extends PgSyncConnection,
    Omit<
      ElectricCollectionConfig<T>,
      `shapeOptions` | `onInsert` | `onUpdate` | `onDelete` | `getKey`
    > {
  /** The registered model (`pg_sync.register_table`'s model name), the shape's `table`. */
  model: string
  /** The key columns, in the table's primary key order (default `["id"]`). */
  primaryKey?: Array<string>
  /** The collection key (default: the key column, or the key columns joined with `|`). */
  getKey?: (row: T) => string | number
  /** More ShapeStream options: `params` (`where`, `params`, `columns`), `liveSse`, `parser`,
   * `onError`, ... `url`, `headers` and `params.table` come from this config. */
  shapeOptions?: Partial<ShapeStreamOptions>
  /** How long an optimistic write waits for its txid before it is rolled back (ms). */
  txidTimeout?: number
  /** Set false for a read-only collection (no onInsert/onUpdate/onDelete). */
  writable?: boolean
}

/** What a handler returns for a mutate result: wait for the txid when changes will come back;
 * a duplicate's changes may already be in the snapshot, so it only waits briefly. */
export async function matchingStrategyFor(
  result: PgSyncTxResult,
  utils: Pick<ElectricCollectionUtils, `awaitTxId`> | undefined,
  timeout: number,
): Promise<MatchingStrategy> {
  if (!result.changes || typeof result.txid !== `number`) return
  if (result.status === `duplicate`) {
    await utils?.awaitTxId(result.txid, timeout).catch(() => undefined)
    return
  }
  return { txid: result.txid, timeout }
}

/** electricCollectionOptions' result, with `utils.pgSyncModel`. */
export type PgSyncCollectionOptions<T extends Row<unknown>> = Omit<
  CollectionConfig<T, string | number>,
  `utils` | `onInsert` | `onUpdate` | `onDelete`
> &
  Pick<ElectricCollectionConfig<T>, `onInsert` | `onUpdate` | `onDelete`> & {
    id?: string
    schema?: never
    utils: ElectricCollectionUtils<T> & { pgSyncModel: () => PgSyncModel }
  }

export function pgSyncCollectionOptions<T extends Row<unknown>>(
  config: PgSyncCollectionConfig<T>,
): PgSyncCollectionOptions<T> {
  const {
    url,
    headers,
    clientId,
    fetch: fetchImpl,
    model,
    primaryKey = [`id`],
    getKey,
    shapeOptions,
    txidTimeout = DEFAULT_TXID_TIMEOUT,
    writable = true,
    ...rest
  } = config
  const conn: PgSyncConnection = { url, headers, clientId, fetch: fetchImpl }
  const m: PgSyncModel = { model, primaryKey }
  const keyOf =
    getKey ??
    ((row: T) =>
      primaryKey.length === 1
        ? (row[primaryKey[0]!] as string | number)
        : primaryKey.map((k) => String(row[k])).join(`|`))
  const write = async ({
    transaction,
    collection,
  }: {
    transaction: { id: string; mutations: Array<any> }
    collection: { utils: ElectricCollectionUtils<T> }
  }): Promise<MatchingStrategy> => {
    const ops = transaction.mutations.map((mutation) => opFor(mutation, m))
    const result = await postTransaction(conn, clientTxIdFor(transaction.id), ops)
    return matchingStrategyFor(result, collection.utils, txidTimeout)
  }
  const options = electricCollectionOptions<T>({
    ...(rest as object),
    getKey: keyOf,
    shapeOptions: {
      ...shapeOptions,
      url: `${url.replace(/\/+$/, ``)}/v1/shape`,
      headers: { ...(headers ?? {}), ...(shapeOptions?.headers ?? {}) },
      parser: { ...pgSyncParser, ...(shapeOptions?.parser ?? {}) },
      params: { ...(shapeOptions?.params ?? {}), table: model },
      ...(fetchImpl && !shapeOptions?.fetchClient ? { fetchClient: fetchImpl } : {}),
    } as ShapeStreamOptions,
    ...(writable ? { onInsert: write, onUpdate: write, onDelete: write } : {}),
  } as unknown as ElectricCollectionConfig<T>)
  return {
    ...options,
    utils: {
      ...options.utils,
      /** The model and key columns this collection writes (read by the offline mutation fn). */
      pgSyncModel: (): PgSyncModel => m,
    },
  }
}
