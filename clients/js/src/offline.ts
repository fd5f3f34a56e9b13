// A mutation function for @tanstack/offline-transactions: its idempotency key becomes the
// pg_sync client transaction id, so a write persisted in the outbox is applied exactly once
// however often it is retried (reloads, lost answers, several tabs), and the answer to a
// replay names the transaction that applied it.

import { NonRetriableError } from '@tanstack/offline-transactions'
import type { PendingMutation } from '@tanstack/db'
import {
  opFor,
  postTransaction,
  PgSyncRejectedError,
  PgSyncRequestError,
  type PgSyncConnection,
  type PgSyncModel,
} from './mutate'
import { DEFAULT_TXID_TIMEOUT } from './collection'

export interface PgSyncOfflineConfig extends PgSyncConnection {
  /** Models by collection id, for collections not made with pgSyncCollectionOptions (whose
   * utils already name their model). */
  models?: Record<string, PgSyncModel>
  /** How long to wait for the write to come back through the shape before the attempt counts
   * as failed (it is retried, and the retry is answered as a duplicate). */
  txidTimeout?: number
}

/** What offline-transactions passes a mutation function (its own type is not exported). */
export interface OfflineMutationFnParams {
  transaction: { id: string; mutations: Array<PendingMutation<any>>; metadata?: Record<string, unknown> }
  idempotencyKey: string
}
export type OfflineMutationFn = (params: OfflineMutationFnParams) => Promise<unknown>

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i

/** The client transaction id for an idempotency key: the key when it is a UUID (the library's
 * default), else a name-based UUID (SHA-256, version 8) so a custom key maps to the same id on
 * every attempt. */
export async function clientTxIdForKey(key: string): Promise<string> {
  if (UUID.test(key)) return key.toLowerCase()
  const digest = new Uint8Array(
    await crypto.subtle.digest(`SHA-256`, new TextEncoder().encode(key)),
  ).slice(0, 16)
  digest[6] = (digest[6]! & 0x0f) | 0x80
  digest[8] = (digest[8]! & 0x3f) | 0x80
  const hex = Array.from(digest, (b) => b.toString(16).padStart(2, `0`)).join(``)
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`
}

function modelOf(collection: any, models: Record<string, PgSyncModel> | undefined): PgSyncModel {
  const own = collection?.utils?.pgSyncModel?.()
  if (own) return own
  const byId = models?.[collection?.id]
  if (byId) return byId
  throw new NonRetriableError(
    `pg_sync: collection "${collection?.id}" names no model (use pgSyncCollectionOptions or pass models)`,
  )
}

/** The mutation function to register in `startOfflineExecutor({ mutationFns: { ... } })`. */
export function pgSyncOfflineMutationFn(config: PgSyncOfflineConfig): OfflineMutationFn {
  const timeout = config.txidTimeout ?? DEFAULT_TXID_TIMEOUT
  return async ({ transaction, idempotencyKey }: OfflineMutationFnParams) => {
    const mutations = transaction.mutations
    const ops = mutations.map((mutation) => opFor(mutation, modelOf(mutation.collection, config.models)))
    let result
    try {
      result = await postTransaction(config, await clientTxIdForKey(idempotencyKey), ops)
    } catch (e) {
      // A refusal or a malformed request will be refused again: drop it (the optimistic state
      // is rolled back); anything else is retried with the same id.
      if (e instanceof PgSyncRejectedError) throw new NonRetriableError(e.message)
      if (e instanceof PgSyncRequestError && !e.retriable) throw new NonRetriableError(e.message)
      throw e
    }
    if (result.changes && typeof result.txid === `number`) {
      const collections = new Set(mutations.map((mutation) => mutation.collection as any))
      for (const collection of collections) {
        const wait = collection?.utils?.awaitTxId?.(result.txid, timeout)
        if (!wait) continue
        if (result.status === `duplicate`) {
          // Applied by an earlier attempt: its change may already be in the snapshot.
          await wait.catch(() => undefined)
        } else {
          await wait
        }
      }
    }
    return result
  }
}
