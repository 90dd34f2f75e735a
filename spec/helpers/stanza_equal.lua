-- Structural comparison of element tables (docs/core.md, "Element tables"), for specs.
--
-- Two elements are equal when they have the same name, the same *effective* namespace (their
-- attr.xmlns, or else the one inherited from the parent, or for the top the namespace in scope),
-- the same attributes other than xmlns, and equal children, where adjacent text is joined and
-- empty text dropped first. That is what a serialize-then-parse round trip must preserve:
-- whether xmlns is spelled out, the attribute order and how text was split are not.
local M = {}

local materialize = require("xmppsm.core").materialize

local function children_of(el)
  materialize(el)   -- raw reads below: a lazy parsed element must have its children first
  local out = {}
  for i = 1, rawlen(el) do
    local c = el[i]
    if type(c) == "string" then
      if c ~= "" then
        if type(out[#out]) == "string" then out[#out] = out[#out] .. c else out[#out + 1] = c end
      end
    else
      out[#out + 1] = c
    end
  end
  return out
end

local function show(v)
  if type(v) == "string" then return string.format("%q", v) end
  return tostring(v)
end

local function diff(a, b, ns_a, ns_b, path)
  if type(a) ~= "table" or type(b) ~= "table" then
    return path .. ": not both tables (" .. type(a) .. ", " .. type(b) .. ")"
  end
  if a.name ~= b.name then return path .. ": name " .. show(a.name) .. " ~= " .. show(b.name) end
  path = path .. "/" .. tostring(a.name)
  local attr_a, attr_b = a.attr or {}, b.attr or {}
  local ea, eb = attr_a.xmlns or ns_a, attr_b.xmlns or ns_b
  if ea ~= eb then return path .. ": namespace " .. show(ea) .. " ~= " .. show(eb) end
  for k, v in pairs(attr_a) do
    if k ~= "xmlns" and attr_b[k] ~= v then
      return path .. ": attribute " .. show(k) .. " " .. show(v) .. " ~= " .. show(attr_b[k])
    end
  end
  for k, v in pairs(attr_b) do
    if k ~= "xmlns" and attr_a[k] == nil then
      return path .. ": extra attribute " .. show(k) .. " = " .. show(v)
    end
  end
  local ca, cb = children_of(a), children_of(b)
  for i = 1, math.max(#ca, #cb) do
    local x, y = ca[i], cb[i]
    if type(x) == "table" and type(y) == "table" then
      local d = diff(x, y, ea, eb, path .. "[" .. i .. "]")
      if d then return d end
    elseif x ~= y then
      return path .. ": child " .. i .. " " .. show(x) .. " ~= " .. show(y)
    end
  end
  return nil
end

--- nil when a and b are structurally equal, else a description of the first difference.
-- ns_a, ns_b: the namespaces in scope around each (default "jabber:client").
function M.diff(a, b, ns_a, ns_b)
  ns_a = ns_a or "jabber:client"
  return diff(a, b, ns_a, ns_b or ns_a, "")
end

--- Whether a and b are structurally equal.
function M.equal(a, b, ns_a, ns_b)
  return M.diff(a, b, ns_a, ns_b) == nil
end

--- nil when every element's `tags` lists exactly its element children, in order; else where not.
function M.check_tags(el, path)
  path = (path or "") .. "/" .. tostring(el.name)
  materialize(el)
  local tags = el.tags
  if type(tags) ~= "table" then return path .. ": no tags table" end
  local j = 0
  for i = 1, rawlen(el) do
    local c = el[i]
    if type(c) == "table" then
      j = j + 1
      if tags[j] ~= c then return path .. ": tags[" .. j .. "] is not child " .. i end
      local d = M.check_tags(c, path)
      if d then return d end
    end
  end
  if rawlen(tags) ~= j then
    return path .. ": tags has " .. rawlen(tags) .. " entries, " .. j .. " expected"
  end
  return nil
end

return M
