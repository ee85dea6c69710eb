-- Prepended to every session script. Key layout (P = state.key_prefix, {sid} = the 11-character
-- session id as a Cluster hash tag):
--   P s:{sid}           hash: user client scopes created sexp aexp cur cexp cat rev rot
--   P c:{sid}:<hex16>   the sealed response that rotated the token with that digest prefix (PX = grace)
--   P u:<username>      zset: the user's sessions by creation time (max_sessions_per_user)
--   P sessions          zset: every session by the expiry of its current refresh token
--   P revoked           zset: revoked sids by the time their access tokens stop being refused
--   P revocations       stream: every revocation, followed by every instance
-- `rot` is the rotated tokens, oldest first, as 24-byte records: the digest's first 8 bytes, then
-- rotated-at and expires-at (ms) as big-endian u64. Lua numbers are doubles: exact below 2^53 ms.
local REC = 24

-- Constant-time comparison of two digests (the rule for secrets holds inside Redis too).
local function ct_eq(a, b)
  if not a or not b or #a ~= #b then return false end
  local d = 0
  for i = 1, #a do
    d = bit.bor(d, bit.bxor(string.byte(a, i), string.byte(b, i)))
  end
  return d == 0
end

local function hex(s)
  return string.format(string.rep('%02x', #s), string.byte(s, 1, #s))
end

-- A revocation goes to the index (resync) and the stream (followers) in the same step, so the two
-- cannot disagree. The entry carries Redis's time in microseconds, for the propagation lag.
local function record_revocation(revoked_key, stream_key, sid, until_secs, maxlen)
  redis.call('ZADD', revoked_key, 'GT', until_secs, sid)
  local t = redis.call('TIME')
  redis.call('XADD', stream_key, 'MAXLEN', '~', maxlen, '*',
    'sid', sid, 'until', until_secs, 't', t[1] .. string.format('%06d', tonumber(t[2])))
end

-- Revokes one session (idempotent). Returns false for an unknown session, else
-- {sid, user, client, newly (0/1), until_secs}.
local function revoke_session(prefix, sid, now, grace, revoked_key, stream_key, maxlen)
  local h = prefix .. 's:{' .. sid .. '}'
  local f = redis.call('HMGET', h, 'rev', 'aexp', 'user', 'client', 'rot')
  if not f[2] then return false end
  local newly = f[1] ~= '1'
  if newly then
    redis.call('HSET', h, 'rev', '1')
    -- A revoked session replays nothing: its sealed copies go now, not when their grace ends.
    local rot = f[5] or ''
    for i = 1, #rot - REC + 1, REC do
      local at = struct.unpack('>I8', rot, i + 8)
      if at + grace > now then
        redis.call('DEL', prefix .. 'c:{' .. sid .. '}:' .. hex(string.sub(rot, i, i + 7)))
      end
    end
    record_revocation(revoked_key, stream_key, sid, f[2], maxlen)
  end
  return {sid, f[3], f[4], newly and 1 or 0, tonumber(f[2])}
end
