"""Operations on a running system: publish, query, verify, status, reindex, snapshot."""
