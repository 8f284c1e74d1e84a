-- Argo CD health check for qmtl.io/VersionSentinel (resource.customizations.health.qmtl.io_VersionSentinel).
-- Healthy: promoted. Progressing: rolling out, or the operator has not yet seen the latest spec.
-- Suspended: paused (an indefinite step pause or a hold). Degraded: aborted, rolled back, or a spec
-- the operator refuses (condition Degraded=True).
local hs = {}
if obj.status == nil or obj.status.observedGeneration == nil
    or obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to observe generation " .. tostring(obj.metadata.generation)
  return hs
end
local message = obj.status.message or ""
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    if c.type == "Degraded" and c.status == "True" then
      hs.status = "Degraded"
      hs.message = (c.reason or "Degraded") .. ": " .. (c.message or message)
      return hs
    end
  end
end
local phase = obj.status.phase or "Pending"
if phase == "Promoted" then
  hs.status = "Healthy"
elseif phase == "Paused" then
  hs.status = "Suspended"
elseif phase == "Aborted" or phase == "RolledBack" then
  hs.status = "Degraded"
else
  hs.status = "Progressing"
end
hs.message = phase .. ": " .. message
return hs
