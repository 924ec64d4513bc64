#!/usr/bin/env python3
"""workerd that dies with the Node process that starts it (for `make bridge` and the tests).

Miniflare starts workerd as a child of Node. When Node is killed (SIGKILL, or by `lifetime`
because whatever started Node died), workerd lives on as an orphan that keeps the bridge's port
and serves it. Miniflare runs `MINIFLARE_WORKERD_PATH` instead of its own workerd when it is set;
pointed at this file, the child asks Linux to kill it when Node dies, then becomes the real
workerd (the same process, with Miniflare's pipes and arguments):

    MINIFLARE_WORKERD_PATH=$PWD/tools/workerd_with_parent.py node bridge/scripts/serve.js

The real binary is the bridge's own (bridge/node_modules/workerd, the one Miniflare would run),
or `WORKERD_BINARY`.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime import lifetime  # noqa: E402

if __name__ == "__main__":
    binary = os.environ.get("WORKERD_BINARY") or str(ROOT / "bridge" / "node_modules" / "workerd" / "bin" / "workerd")
    lifetime.die_with_parent()  # kept across exec: the signal comes when Node, the parent, dies
    os.execv(binary, [binary, *sys.argv[1:]])
