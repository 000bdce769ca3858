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

# Celery task names: the wire contract with producers (docs/message-format.md)
INDEX_TASK = "cardigan.index_event"
BULK_TASK = "cardigan.index_bulk"

# exit statuses
EX_UNREACHABLE = 2  # a command could not reach a server: one line with the fix
EX_CONFIG = 78  # sysexits.h: a worker's configuration error; `cardigan worker` does not restart on it
