"""One request followed across the services: its id travels in the `Pagemesh-Request-Id` NATS
header of everything sent to its client, and every service that handles it logs under it (the
`request` span's `request_id` in JSON logs, or the field of that name)."""

import asyncio
import json
from pathlib import Path

import nats as nats_py
import openai

from conftest import Mesh, wait_for

HEADER = "Pagemesh-Request-Id"
SERVICES = {"pagemesh_gateway", "pagemesh_tokenizer", "pagemesh_scheduler", "pagemesh_detokenizer"}


def json_lines(path):
    lines = []
    for line in Path(path).read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass
    return lines


def services_logging(path, request_id):
    """The crates that wrote log lines about `request_id`."""
    found = set()
    for line in json_lines(path):
        named = (line.get("span") or {}).get("request_id") or (line.get("fields") or {}).get("request_id")
        if named == request_id:
            found.add(line["target"].split("::")[0])
    return found


async def headers_of_answer(url, prefix, body, headers=None):
    """The request-id header of every message answering a generation request sent over NATS
    (with `headers` on the request, if given)."""
    nc = await nats_py.connect(url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(f"{prefix}.generate", json.dumps(body).encode(), reply=inbox, headers=headers)
        headers = []
        while True:
            msg = await sub.next_msg(timeout=30)
            headers.append((msg.headers or {}).get(HEADER))
            data = json.loads(msg.data)
            if "error" in data or data.get("done"):
                return headers
    finally:
        await nc.close()


def test_a_request_is_named_in_its_headers_and_logged_under_its_id_by_every_service(nats, monkeypatch):
    services = ",".join(f"{crate}=debug" for crate in sorted(SERVICES))
    monkeypatch.setenv("PAGEMESH_LOG", f"warn,{services}")
    mesh = Mesh(nats, "traced", serve_args=["--log-format", "json"])
    try:
        mesh.wait_ready()
        log = mesh.serve.log.name

        # Over HTTP: the gateway names the request, and every service logs under that name.
        client = openai.OpenAI(base_url=mesh.base + "/v1", api_key="x")
        out = client.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=4,
                                        temperature=0)
        wait_for(lambda: SERVICES <= services_logging(log, out.id), timeout=10,
                 what=f"log lines about {out.id} from {sorted(SERVICES)}")

        # Over NATS: every chunk, and an error, names the request in its headers.
        body = {"request_id": "traced-1", "prompt": "Once", "max_tokens": 3, "temperature": 0}
        headers = asyncio.run(headers_of_answer(nats.url, "traced", body))
        assert len(headers) >= 2 and all(h == "traced-1" for h in headers), headers
        bad = {"request_id": "traced-bad", "prompt": "Once", "top_p": 7}
        assert asyncio.run(headers_of_answer(nats.url, "traced", bad)) == ["traced-bad"]
        wait_for(lambda: "pagemesh_scheduler" in services_logging(log, "traced-1"), timeout=10,
                 what="the scheduler's log lines about traced-1")

        # A header that is not a request id (too long) is ignored: the request is served as
        # usual, its answer named by the id in its body, and nothing is logged under the header.
        forged = "x" * 4096
        body = {"request_id": "traced-2", "prompt": "Once", "max_tokens": 3, "temperature": 0}
        headers = asyncio.run(headers_of_answer(nats.url, "traced", body, headers={HEADER: forged}))
        assert len(headers) >= 2 and all(h == "traced-2" for h in headers), headers
        assert services_logging(log, forged) == set()
    finally:
        mesh.stop()
