"""The Milvus index and the Redis records around it: guard, dead letters, tombstones, row schema."""
