"""Names shared between processes: Redis keys, Celery task names, exit statuses.

Each was a string literal copied between modules (the bench read what the writer wrote under a
key it had re-typed); one module keeps writer, bench, CLI and status on the same names.
"""

from __future__ import annotations

# Redis keys (state store); {alias} is the Milvus alias, e.g. ``products``
FRESHNESS_KEY = "cardigan:freshness_ms"  # publish → vector written, ms (the writer pushes, bench/demo read)
STATS_KEY = "cardigan:stats:{alias}"  # per-process pipeline stage stats (workers.pipeline)
TARGETS_KEY = "cardigan:write_targets:{alias}"  # collections every write goes to (two during a reindex)
OUTCOME_KEY = "cardigan:outcome:{alias}:{product_id}"  # a product's last outcome (`events show`, `publish --wait`)
REINDEX_STATE_KEY = "cardigan:reindex:{alias}"  # a reindex run's phase and target (cardigan.ops.reindex)
REINDEX_DONE_KEY = "cardigan:reindex:{alias}:chunks"  # chunks a reindex has copied (resume)
# double listings (cardigan/duplicates): products waiting for a check, found pairs, backfill cursor
DUP_PENDING_KEY = "cardigan:dup:pending:{alias}"  # ZSET product_id -> when it is due (ms); writers add, detectors drain
DUP_VERSION_KEY = "cardigan:dup:version:{alias}"  # ZSET product_id -> newest version queued (a writer holds its rows)
DUP_SINCE_KEY = "cardigan:dup:since:{alias}"  # HASH product_id -> publish (or write) time, ms: detection lag
DUP_PAIRS_KEY = "cardigan:dup:pairs:{alias}"  # HASH "<a>\x1f<b>" (a < b) -> JSON evidence
DUP_LINKS_KEY = "cardigan:dup:links:{alias}:{product_id}"  # SET: the products paired with one product
DUP_LAG_KEY = "cardigan:dup:lag_ms:{alias}"  # LIST of publish -> pair checked samples, ms (newest first)
DUP_COUNTS_KEY = "cardigan:dup:counts:{alias}"  # HASH counters: checked, pairs_added, pairs_dropped, failures, groups_new
DUP_SCAN_KEY = "cardigan:dup:scan:{alias}"  # HASH: the backfill's cursor and counts (resumable)

# Celery task names: the wire contract with producers (docs/message-format.md)
INDEX_TASK = "cardigan.index_event"
BULK_TASK = "cardigan.index_bulk"

# exit statuses
EX_UNREACHABLE = 2  # a command could not reach a server: one line with the fix
EX_CONFIG = 78  # sysexits.h: a worker's configuration error; `cardigan worker` does not restart on it
