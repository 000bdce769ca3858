"""Double listings: pairs found at write time (detect), kept in Redis (pairs), grouped (groups)."""
