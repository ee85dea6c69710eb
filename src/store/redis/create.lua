-- Creates a session and keeps its user within max_sessions_per_user.
-- KEYS: P s:{sid}, P u:<user>, P sessions, P revoked, P revocations
-- ARGV: prefix, sid, user, client, scopes, now, session_exp, access_exp, token digest, token_exp,
--       max_sessions, grace, stream maxlen
-- Returns {'collision'} or {'ok', evicted...} (each as revoke_session returns it).
local prefix, sid = ARGV[1], ARGV[2]
local now, texp, sexp = tonumber(ARGV[6]), tonumber(ARGV[10]), tonumber(ARGV[7])
if redis.call('EXISTS', KEYS[1]) == 1 then return {'collision'} end
-- The user's index forgets sessions that are gone, revoked or expired before counting.
for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local f = redis.call('HMGET', prefix .. 's:{' .. m .. '}', 'rev', 'cexp')
  if not f[2] or f[1] == '1' or tonumber(f[2]) <= now then redis.call('ZREM', KEYS[2], m) end
end
redis.call('HSET', KEYS[1], 'user', ARGV[3], 'client', ARGV[4], 'scopes', ARGV[5], 'created', ARGV[6],
  'sexp', ARGV[7], 'aexp', ARGV[8], 'cur', ARGV[9], 'cexp', ARGV[10], 'cat', ARGV[6], 'rev', '0', 'rot', '')
-- TTLs are relative to the gateway's clock, so skew between it and Redis's cannot shorten them.
redis.call('PEXPIRE', KEYS[1], math.max(texp - now, 1))
redis.call('ZADD', KEYS[2], now, sid)
local keep = math.max(sexp - now, 1)
if redis.call('PTTL', KEYS[2]) < keep then redis.call('PEXPIRE', KEYS[2], keep) end
redis.call('ZADD', KEYS[3], texp, sid)
local out = {'ok'}
local excess = redis.call('ZCARD', KEYS[2]) - math.max(tonumber(ARGV[11]), 1)
if excess > 0 then
  for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, excess - 1)) do
    redis.call('ZREM', KEYS[2], m)
    local r = revoke_session(prefix, m, now, tonumber(ARGV[12]), KEYS[4], KEYS[5], ARGV[13])
    if r then table.insert(out, r) end
  end
end
return out
