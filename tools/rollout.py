"""``homefeed rollout start | status | abort | undo | history | report``: the operators' side
of a canary release, over the rollout controller's admin RPCs (``RolloutAdminService``).

The controller's admin address and the admin token come from the running local mesh
(``<home>/run/mesh.json``), or from ``--addr`` and ``HOMEFEED_ADMIN_TOKEN`` (a cluster:
``kubectl port-forward`` to the controller's admin port).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from homefeed.rollout.v1 import rollout_pb2, rollout_pb2_grpc

from contract.paths import Paths
from services.common.admin import AUTHORIZATION_KEY
from tools.mesh import CONTROLLER, running_mesh

RPC_TIMEOUT_S = 30.0


class RolloutClient:
    """The admin RPCs, authorized with the token."""

    def __init__(self, address: str, token: str) -> None:
        self.address = address
        self._channel = grpc.insecure_channel(address)
        self._stub = rollout_pb2_grpc.RolloutAdminServiceStub(self._channel)
        self._metadata = ((AUTHORIZATION_KEY, f"Bearer {token}"),)

    @classmethod
    def from_mesh(cls, home: Path | None = None) -> RolloutClient:
        home = home or Paths.from_env().home
        mesh = running_mesh(home, "pass --addr (and set HOMEFEED_ADMIN_TOKEN)")
        address = mesh.admin_addresses.get(CONTROLLER)
        if address is None:
            raise ValueError(f"the mesh under {home} runs no rollout controller")
        return cls(address, mesh.admin_token)

    def close(self) -> None:
        self._channel.close()

    def start(
        self,
        version: str,
        steps: Sequence[int] = (),
        interval_s: float = 0.0,
        threshold: int = 0,
        mirror_share: float = -1.0,
        min_feeds: int = 0,
    ) -> rollout_pb2.RolloutStatus:
        request = rollout_pb2.StartRolloutRequest(
            version=version,
            steps=list(steps),
            interval_s=interval_s,
            threshold=threshold,
            mirror_share=mirror_share,
            min_feeds=min_feeds,
        )
        return self._stub.StartRollout(request, timeout=RPC_TIMEOUT_S, metadata=self._metadata)

    def status(self) -> rollout_pb2.RolloutStatus:
        return self._stub.GetRolloutStatus(
            rollout_pb2.GetRolloutStatusRequest(), timeout=RPC_TIMEOUT_S, metadata=self._metadata
        )

    def abort(self, reason: str = "") -> rollout_pb2.RolloutStatus:
        return self._stub.AbortRollout(
            rollout_pb2.AbortRolloutRequest(reason=reason),
            timeout=RPC_TIMEOUT_S,
            metadata=self._metadata,
        )

    def undo(self, reason: str = "") -> rollout_pb2.RolloutStatus:
        return self._stub.UndoRollout(
            rollout_pb2.UndoRolloutRequest(reason=reason),
            timeout=300.0,  # stable reloads the previous bundle
            metadata=self._metadata,
        )

    def history(self, limit: int = 0) -> list[rollout_pb2.RolloutStatus]:
        response = self._stub.ListRollouts(
            rollout_pb2.ListRolloutsRequest(limit=limit),
            timeout=RPC_TIMEOUT_S,
            metadata=self._metadata,
        )
        return list(response.rollouts)

    def wait(
        self, phases: Sequence[str], timeout_s: float, poll_s: float = 0.2
    ) -> rollout_pb2.RolloutStatus:
        """Poll the status until its phase is one of ``phases`` (TimeoutError after
        ``timeout_s``, naming the last status)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if status.phase in phases:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"rollout {status.rollout_id} still {status.phase} after {timeout_s:g} s: "
                    f"{status.message}"
                )
            time.sleep(poll_s)


def detail(status: rollout_pb2.RolloutStatus) -> dict[str, Any]:
    return json.loads(status.detail_json) if status.detail_json else {}


def describe(status: rollout_pb2.RolloutStatus) -> str:
    """A few lines an operator reads."""
    if not status.rollout_id:
        return status.message or "no rollout has been started"
    steps = " -> ".join(
        f"[{s}]" if i == status.step and status.phase == "PROGRESSING" else str(s)
        for i, s in enumerate(status.steps)
    )
    lines = [
        f"rollout {status.rollout_id}: version {status.version} {status.phase}",
        f"  weight {status.weight} %   steps {steps} %   failed checks "
        f"{status.failed_checks}/{status.threshold}",
        f"  {status.message}",
    ]
    if status.reason and status.reason != status.message:
        lines.append(f"  reason: {status.reason}")
    windows = detail(status).get("windows") or []
    if windows:
        last = windows[-1]
        arms = last.get("arms", {})
        lines.append(
            f"  last window: {last.get('decision')} at {last.get('weight')} %, feeds stable "
            f"{arms.get('stable', {}).get('feeds')} / canary {arms.get('canary', {}).get('feeds')}"
        )
        failed = [c["name"] for c in last.get("checks", []) if c.get("passed") is False]
        if failed:
            lines.append(f"  failed checks: {', '.join(failed)}")
    return "\n".join(lines)


def run(args: Any) -> int:
    """The ``homefeed rollout`` subcommands (parsed in ``tools.cli``)."""
    if args.addr:
        token = os.environ.get("HOMEFEED_ADMIN_TOKEN", "")
        client = RolloutClient(args.addr, token)
    else:
        client = RolloutClient.from_mesh()
    try:
        return _run(client, args)
    except grpc.RpcError as err:
        print(
            f"homefeed rollout {args.action}: {err.code().name}: {err.details()}", file=sys.stderr
        )
        return 1
    finally:
        client.close()


def _run(client: RolloutClient, args: Any) -> int:
    action = args.action
    if action == "start":
        steps = [int(s) for s in args.steps.split(",")] if args.steps else []
        status = client.start(
            str(args.version),
            steps,
            args.interval or 0.0,
            args.threshold or 0,
            -1.0 if args.mirror_share is None else args.mirror_share,
            args.min_feeds or 0,
        )
        print(describe(status))
        if args.wait:
            status = client.wait(("PROMOTED", "FAILED", "ABORTED"), args.wait_timeout)
            print(describe(status))
            return 0 if status.phase == "PROMOTED" else 1
        return 0
    if action == "status":
        status = client.status()
        print(json.dumps(detail(status), indent=2) if args.json else describe(status))
        return 0
    if action == "abort":
        print(describe(client.abort(args.reason)))
        return 0
    if action == "undo":
        print(describe(client.undo(args.reason)))
        return 0
    if action == "history":
        rollouts = client.history(args.limit)
        if args.json:
            print(json.dumps([detail(r) for r in rollouts], indent=2))
        for status in rollouts if not args.json else []:
            print(describe(status))
        if not rollouts:
            print("no rollouts yet")
        return 0
    if action == "report":
        from tools.rollout_report import write_report

        rollouts = client.history(0)
        chosen = [r for r in rollouts if not args.id or r.rollout_id == args.id]
        if not chosen:
            print("homefeed rollout report: no such rollout", file=sys.stderr)
            return 1
        md, png = write_report(detail(chosen[0]), Path(args.out))
        print(f"wrote {md} and {png}")
        return 0
    raise ValueError(f"unknown rollout action {action!r}")
