"""The hub cache round trip with Python's huggingface_hub / diffusers (pinned env: torch 2.15.0,
diffusers 0.42.1), without the internet: a hub stand-in on loopback serves the tiny fixture
pipelines with the hub's HTTP API.

1. `kandinsky download` writes the cache; diffusers loads the pipelines from it
   (`from_pretrained(id, local_files_only=True)`).
2. `huggingface_hub.snapshot_download` writes a second cache; `kandinsky generate --model <id>`
   runs from it offline.

Run after `cargo build --release -p kandinsky-cli`:  python tools/hub_cache_roundtrip.py
"""
import hashlib
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BIN = os.path.join(ROOT, "target", "release", "kandinsky")
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPOS = {"test-org/tiny-decoder": "fixtures/pipelines/tiny-2-2-decoder",
         "test-org/tiny-prior": "fixtures/pipelines/tiny-2-2-prior"}


def files_of(d):
    out = {}
    for base, _, names in os.walk(os.path.join(ROOT, d), followlinks=True):
        for n in names:
            p = os.path.join(base, n)
            out[os.path.relpath(p, os.path.join(ROOT, d))] = open(p, "rb").read()
    return out


FILES = {r: files_of(d) for r, d in REPOS.items()}


class Hub(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def answer(self, body):
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            repo = "/".join(parts[2:4])
            if parts[4:5] == ["tree"]:
                # huggingface_hub's snapshot_download lists files with the tree API.
                tree = []
                for f, b in FILES[repo].items():
                    e = {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    if f.endswith(".safetensors"):
                        e["lfs"] = {"oid": hashlib.sha256(b).hexdigest(), "size": len(b), "pointerSize": 134}
                    tree.append(e)
                data = json.dumps(tree).encode()
            else:
                sib = [{"rfilename": f, "size": len(b)} for f, b in FILES[repo].items()]
                data = json.dumps({"id": repo, "sha": COMMIT, "siblings": sib}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return data if body else b""
        repo, f = "/".join(parts[:2]), "/".join(parts[4:])
        data = FILES.get(repo, {}).get(f)
        if data is None:
            self.send_response(404)
            self.end_headers()
            return b""
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        if f.endswith(".safetensors"):
            self.send_header("X-Linked-Etag", '"%s"' % hashlib.sha256(data).hexdigest())
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("ETag", '"%s"' % hashlib.sha256(data).hexdigest())
        else:
            self.send_header("ETag", '"%s"' % hashlib.sha1(data).hexdigest())
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        return data if body else b""

    def do_HEAD(self):
        self.answer(False)

    def do_GET(self):
        self.wfile.write(self.answer(True))


def main():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = "http://127.0.0.1:%d" % server.server_address[1]
    os.environ["HF_ENDPOINT"] = endpoint

    cache1 = tempfile.mkdtemp()
    for repo in REPOS:
        subprocess.run([BIN, "download", repo], check=True, env={**os.environ, "HF_HUB_CACHE": cache1})
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline
    KandinskyV22Pipeline.from_pretrained("test-org/tiny-decoder", cache_dir=cache1, local_files_only=True)
    KandinskyV22PriorPipeline.from_pretrained("test-org/tiny-prior", cache_dir=cache1, local_files_only=True)
    print("1. diffusers loaded both pipelines from the cache kandinsky download wrote")

    from huggingface_hub import snapshot_download
    cache2 = tempfile.mkdtemp()
    for repo in REPOS:
        snapshot_download(repo, cache_dir=cache2, endpoint=endpoint)
    out = os.path.join(cache2, "out.png")
    subprocess.run([BIN, "generate", "--model", "test-org/tiny-decoder", "--prior", "test-org/tiny-prior",
                    "--prompt", "a red cat", "--width", "64", "--height", "64", "--steps", "3",
                    "--prior-steps", "2", "--seed", "5", "--output", out], check=True,
                   env={**os.environ, "HF_HUB_CACHE": cache2, "HF_HUB_OFFLINE": "1"})
    print("2. kandinsky generate ran offline from the cache huggingface_hub.snapshot_download wrote:", out)
    server.shutdown()


if __name__ == "__main__":
    sys.exit(main())
