--- The seed of a randomized spec: XMPPSM_SEED when it is set (to replay a failure), otherwise
-- the time. Seeds math.random with it and returns it, for the spec to name in its failures.
return function()
  local seed = tonumber(os.getenv("XMPPSM_SEED") or "") or os.time()
  math.randomseed(seed)
  return seed
end
