#!/usr/bin/env python3
"""Smoke test of examples/http on a GPU machine without curl: starts http_server on the
given device, checks /healthz, a static file, HEAD, keep-alive reuse, POST /sha256 against
hashlib, a malformed request's 400, then SIGINT. Exit 0 when every check holds.
   scripts/gpu_smoke_http.py SERVER ROOT [DEVICE]"""
import hashlib, os, random, signal, socket, subprocess, sys, time

server, root = sys.argv[1], sys.argv[2]
device = sys.argv[3] if len(sys.argv) > 3 else "cuda"
port = random.randint(20000, 50000)
p = subprocess.Popen([server, "--device", device, "--root", root, "--address", "127.0.0.1", "--port", str(port)],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
def fail(msg):
    print("FAIL:", msg); p.send_signal(signal.SIGINT); print(p.communicate(timeout=30)[0]); sys.exit(1)
line = ""
for _ in range(600):
    line = p.stdout.readline()
    if "listening" in line or p.poll() is not None: break
print(line.strip())
if p.poll() is not None: fail("server exited")

def request(sock, raw):
    sock.sendall(raw)
    data = b""
    while b"\r\n\r\n" not in data:
        c = sock.recv(65536)
        if not c: break
        data += c
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for h in head.split(b"\r\n")[1:]:
        k, _, v = h.partition(b":")
        if k.strip().lower() == b"content-length": length = int(v)
    if not raw.startswith(b"HEAD"):
        while len(body) < length:
            c = sock.recv(65536)
            if not c: break
            body += c
    return head.split(b"\r\n")[0].decode(), head, body

s = socket.create_connection(("127.0.0.1", port), timeout=10)
st, _, body = request(s, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
if "200" not in st or body.strip() != b"ok": fail("healthz: %s %r" % (st, body))
files = [f for f in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, f))]
want = open(os.path.join(root, files[0]), "rb").read()
st, head, body = request(s, ("GET /%s HTTP/1.1\r\nHost: x\r\n\r\n" % files[0]).encode())
if "200" not in st or body != want: fail("static %s: %s (%d vs %d bytes)" % (files[0], st, len(body), len(want)))
st, head, body = request(s, ("HEAD /%s HTTP/1.1\r\nHost: x\r\n\r\n" % files[0]).encode())
if "200" not in st: fail("HEAD: " + st)
blob = os.urandom(200000)
st, _, body = request(s, b"POST /sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(blob) + blob)
if "200" not in st or body.strip().decode() != hashlib.sha256(blob).hexdigest(): fail("sha256: %s %r" % (st, body[:80]))
s.close()
s = socket.create_connection(("127.0.0.1", port), timeout=10)
st, _, _ = request(s, b"GARBAGE\r\n\r\n")
if "400" not in st: fail("malformed request: " + st)
s.close()
p.send_signal(signal.SIGINT)
out = p.communicate(timeout=60)[0]
print(out.strip().splitlines()[-1] if out.strip() else "")
if p.returncode != 0: fail("exit %d" % p.returncode)
print("PASS: healthz, static (%s, %d B), HEAD, keep-alive, sha256 of 200000 B, 400 on %s" % (files[0], len(want), device))
