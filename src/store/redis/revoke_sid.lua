-- Refuses a sid's access tokens without a session record (client-credentials tokens).
-- KEYS: P revoked, P revocations
-- ARGV: sid, until_secs, stream maxlen
record_revocation(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
return 1
