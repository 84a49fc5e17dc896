"""Push registrations (PROTOCOL.md section 19): PUSH_REGISTER and PUSH_UNREGISTER.

A registration is per (user, device), stored in the DeviceStore, which replaces the device's
previous one and keeps at most MAX_TARGETS_PER_USER per user. The gateway only writes it: the
notifier (notifier.py) reads the targets when a message reaches a device that is not online.
Registrations share the state-change rate limit with READ_MARK and CONV_HIDE (spec 9.4): a
device registers after each login or token change, a few times a day, never in a loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from improto.errors import ErrorCode
from improto.frames import PushRegister, PushRegisterOk, PushUnregister, PushUnregisterOk
from improto_server.model import PushTarget
from improto_server.ports import DeviceStore
from improto_server.rate_limits import RateLimits
from improto_server.service import RequestError, available, check_rate

if TYPE_CHECKING:
    from improto_server.service import Caller


class PushService:
    def __init__(self, devices: DeviceStore, limits: RateLimits, platforms: Iterable[str]) -> None:
        self.devices = devices
        self.limits = limits
        self.platforms = frozenset(platforms)  # what PUSH_REGISTER may name (config)

    async def register(self, caller: Caller, req: PushRegister) -> PushRegisterOk:
        # The frame's own checks (lengths, characters, options) are the codec's; the set of
        # platforms is this server's: the same INVALID_FIELD, before anything is counted.
        if req.platform not in self.platforms:
            raise RequestError(ErrorCode.INVALID_FIELD, f"unknown platform {req.platform}")
        check_rate(self.limits.state_op(caller.user_id), "too many push registrations")
        target = PushTarget(req.platform, req.token, req.preview)
        await available(self.devices.set_target(caller.user_id, caller.device_id, target))
        return PushRegisterOk(request_id=req.request_id)

    async def unregister(self, caller: Caller, req: PushUnregister) -> PushUnregisterOk:
        """Also when nothing is registered: the answer says the device gets no notification."""
        check_rate(self.limits.state_op(caller.user_id), "too many push registrations")
        await available(self.devices.remove_target(caller.user_id, caller.device_id))
        return PushUnregisterOk(request_id=req.request_id)
