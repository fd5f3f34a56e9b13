// @pg-sync/client: TanStack DB on pg_sync. Reads: Electric's Shape API (`/v1/shape`);
// writes: `/sync/mutate` (exactly once per client transaction id). No store of its own.
// The @tanstack/offline-transactions mutation function is in `@pg-sync/client/offline`.

export {
  pgSyncCollectionOptions,
  matchingStrategyFor,
  DEFAULT_TXID_TIMEOUT,
  type PgSyncCollectionConfig,
  type PgSyncCollectionOptions,
  type MatchingStrategy,
} from './collection'
export {
  postTransaction,
  opFor,
  clientTxIdFor,
  toWireJson,
  resolveHeaders,
  PgSyncRejectedError,
  PgSyncRequestError,
  DEFAULT_CLIENT_ID,
  type HeaderValue,
  type PgSyncConnection,
  type PgSyncModel,
  type PgSyncOp,
  type PgSyncTxResult,
} from './mutate'
export { pgSyncParser, parseInt8, parseBytea } from './parser'
