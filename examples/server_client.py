"""The OpenAI-compatible server, in-process, offline: the official openai client generates and edits through it.

    python examples/server_client.py [OUT_DIR]

The router behind the server talks to the loopback OpenAI sandbox, so no key and no network
are needed. In production you would run ``pixroute serve --keys keys.toml`` (or
:func:`router.server.serve`) with real provider keys, and point any OpenAI client at it.
"""

from __future__ import annotations

import base64
import io
import sys
import tempfile
from pathlib import Path

import openai
from PIL import Image

from providers.openai import OpenAIProvider
from providers.sandbox import OpenAISandbox
from router import AsyncRouter
from router.keys import ServerKeys
from router.server import ServerThread, create_app


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def main(out_dir: Path) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    with OpenAISandbox() as sandbox:  # a real HTTP server on 127.0.0.1 that speaks OpenAI's Images API
        router = AsyncRouter([OpenAIProvider(api_key=sandbox.api_key, base_url=sandbox.base_url)],
                             policy="balanced", ledger=":memory:")
        keys = ServerKeys()
        key = keys.add("example-app", budget_usd="1.00", period="day")  # only its hash is kept
        app = create_app(router, keys=keys, close_router=True)
        with ServerThread(app) as server:
            print(f"pixroute server on {server.base_url}")
            client = openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0)
            print("models:", ", ".join(f"{m.id} ({m.owned_by})" for m in client.models.list()))

            raw = client.images.with_raw_response.generate(
                prompt="a lighthouse at dusk, oil painting", size="1024x1024",
                extra_body={"seed": 7, "negative_prompt": "blurry"},  # the router's own fields ride along
            )
            generated = raw.parse()
            assert generated.data and generated.data[0].b64_json
            picture = base64.b64decode(generated.data[0].b64_json)
            (out_dir / "lighthouse.png").write_bytes(picture)
            print(f"generate: served by {raw.headers['x-imagerouter-provider']}/{raw.headers['x-imagerouter-model']}"
                  f" for ${raw.headers['x-imagerouter-cost-usd']}, {generated.size}, "
                  f"request {raw.headers['x-imagerouter-request-id']}")
            for warning in raw.headers.get_list("x-imagerouter-warning"):
                print(f"  warning: {warning}")

            mask = Image.new("RGBA", (1024, 1024), (0, 0, 0, 255))
            mask.paste((0, 0, 0, 0), (0, 0, 512, 1024))  # OpenAI's convention: alpha 0 = repaint (the left half)
            raw = client.images.with_raw_response.edit(
                image=("lighthouse.png", picture, "image/png"), mask=("mask.png", _png(mask), "image/png"),
                prompt="add a red door",
            )
            edited = raw.parse()
            assert edited.data and edited.data[0].b64_json
            (out_dir / "lighthouse-edit.png").write_bytes(base64.b64decode(edited.data[0].b64_json))
            print(f"edit: served by {raw.headers['x-imagerouter-provider']}/{raw.headers['x-imagerouter-model']}"
                  f" for ${raw.headers['x-imagerouter-cost-usd']}, {edited.size}")

        spent = router.ledger.spent(["key:example-app"], period="day")
        print(f"spent by key example-app today: ${spent} of $1.00")
        print(f"sandbox calls: {sandbox.hits('/v1/images/generations')} generation, "
              f"{sandbox.hits('/v1/images/edits')} edit")
    for path in sorted(out_dir.glob("*.png")):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="pixroute-server-"))
    sys.exit(main(target))
