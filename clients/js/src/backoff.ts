/**
 * Full-jitter exponential backoff: the n-th consecutive retry waits a uniform random delay in
 * `[0, min(max, min * 2^n)]`, so the clients of a failed edge spread out instead of coming
 * back together, and no wait exceeds `max`.
 */
export function backoff(minMs: number, maxMs: number, attempt: number, random: () => number = Math.random): number {
  const bound = Math.min(maxMs, minMs * 2 ** Math.min(Math.max(attempt, 0), 30));
  return Math.floor(random() * (Math.max(bound, 0) + 1));
}
