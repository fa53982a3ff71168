"""Test runtime entry point: `python -m agent_cli.main gateway run --replace`.

Serves GET /status as JSON over HTTP on the unix socket $AGENT_HOME/run/status.sock (mode 0600),
reporting who it is, which release it was imported from, and what its sandbox let it do.
POST /toolrun?socket=PATH plays a gateway escalating untrusted code: it sends the body to the
node agent's tool-run socket (its own, $AGENT_HOME/run/toolrun.sock, unless PATH says otherwise)
and answers with the agent's reply, or {"connect_error": ...}.
"""
import hashlib
import http.server
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import urllib.parse

HERE = os.path.dirname(os.path.realpath(__file__))


def release_info():
    with open(os.path.join(HERE, "release.json")) as f:
        return json.load(f)


def probe(fn):
    try:
        fn()
        return "allowed"
    except Exception as e:  # the probe reports what the sandbox did, whatever it was
        return "denied: %s" % type(e).__name__


def write_etc():
    with open("/etc/agent-probe", "w") as f:
        f.write("x")
    os.unlink("/etc/agent-probe")


def read_siblings(home):
    gateways = os.path.dirname(os.path.dirname(home))
    found = []
    for name in sorted(os.listdir(gateways)):
        other = os.path.join(gateways, name, "home")
        if other != home and os.path.isdir(other):
            found.append(other)
    if not found:
        raise FileNotFoundError("no sibling")
    for other in found:
        os.listdir(other)


def connect_out(target):
    host, port = target.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=2)
    s.close()


def probes(home):
    result = {
        "write_etc": probe(write_etc),
        "read_sibling_home": probe(lambda: read_siblings(home)),
    }
    target = os.environ.get("PROBE_CONNECT")
    if target:
        result["connect"] = probe(lambda: connect_out(target))
    return result


def toolrun(home, query, body):
    path = urllib.parse.parse_qs(query).get("socket", [os.path.join(home, "run", "toolrun.sock")])[0]
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    except OSError as e:
        return json.dumps({"connect_error": e.strerror}).encode()
    with s:
        s.sendall(body)
        s.shutdown(socket.SHUT_WR)
        return s.makefile("rb").read()


def read_material(home):
    """sha256 of each variable ("env:NAME") and home file ("file:path") named in
    REPORT_SHA256, read by the gateway itself: proof it got its material, without the values."""
    out = {}
    for item in filter(None, os.environ.get("REPORT_SHA256", "").split(",")):
        kind, _, name = item.partition(":")
        try:
            if kind == "env":
                data = os.environ[name].encode()
            else:
                with open(os.path.join(home, name), "rb") as f:
                    data = f.read()
            out[item] = hashlib.sha256(data).hexdigest()
        except (KeyError, OSError) as e:
            out[item] = "error: " + type(e).__name__
    return out


def status(home):
    info = release_info()
    return {
        "pid": os.getpid(),
        "profile": os.environ.get("AGENT_PROFILE", ""),
        "release_sha": os.environ.get("AGENT_RELEASE_SHA256", ""),
        "pythonpath": os.environ.get("PYTHONPATH", ""),
        "sys_path": [os.path.abspath(p or os.curdir) for p in sys.path],
        "version": info["version"],
        "tools": info["tools"],
        "release_root": os.path.dirname(HERE),
        "cwd": os.getcwd(),
        "uid": os.getuid(),
        "probes": probes(home),
        "read": read_material(home),
    }


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def mute(path):
    """Hostile: accept on the status socket and never answer."""
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    os.chmod(path, 0o600)
    s.listen(64)
    print("agent_cli: mute on %s" % path, flush=True)
    held = []
    while True:
        conn, _ = s.accept()
        held.append(conn)


def swap_forever(home, target):
    """Hostile: exchange home/sub with a symlink to target, as fast as possible."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    sub, link = os.path.join(home, "sub"), os.path.join(home, "swap")
    os.makedirs(os.path.join(sub, "deeper"), exist_ok=True)
    if not os.path.lexists(link):
        os.symlink(target, link)
    at_fdcwd, rename_exchange = -100, 2
    a, b = sub.encode(), link.encode()
    while True:
        libc.renameat2(at_fdcwd, a, at_fdcwd, b, rename_exchange)


def rewrite_environ(updates):
    """Hostile: overwrite this process's environment block in place, so /proc/<pid>/environ
    shows the new values."""
    import ctypes
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    start, end = int(fields[47]), int(fields[48])  # env_start, env_end (fields 50, 51)
    old = ctypes.string_at(start, end - start)
    out = []
    for kv in old.split(b"\0"):
        k, _, _ = kv.partition(b"=")
        if k.decode() in updates:
            kv = k + b"=" + updates[k.decode()].encode()
        out.append(kv)
    new = b"\0".join(out)
    if len(new) <= len(old):
        ctypes.memmove(start, new.ljust(len(old), b"\0"), len(old))


def forge_forever(snapshot):
    """Hostile: when `current` moves, look like the new release without restarting."""
    root = os.environ["AGENT_ROOT"]
    seen = os.readlink(root)
    while True:
        now = os.readlink(root)
        if now != seen:
            seen = now
            target = os.path.realpath(root)
            sha, _, label = os.path.basename(target).partition("-")
            rewrite_environ({"AGENT_RELEASE_SHA256": sha, "AGENT_RELEASE_LABEL": label})
            os.chdir(target)
            snapshot["release_sha"] = sha
            snapshot["cwd"] = target
            snapshot["sys_path"] = [target if p == HERE.rsplit("/", 1)[0] else p for p in snapshot["sys_path"]]
        threading.Event().wait(0.005)


def serve(mode):
    info = release_info()
    if info.get("crash_at_start"):
        print("agent_cli: this release is broken on purpose", file=sys.stderr)
        sys.exit(3)
    home = os.environ["AGENT_HOME"]
    run = os.path.join(home, "run")
    os.makedirs(run, mode=0o700, exist_ok=True)
    path = os.path.join(run, "status.sock")
    try:
        os.unlink(path)  # --replace: a previous instance's socket is taken over
    except FileNotFoundError:
        pass
    hostile = info.get("hostile")
    if hostile == "mute":
        mute(path)
    snapshot = status(home)
    snapshot["mode"] = mode
    if hostile == "swap":
        threading.Thread(target=swap_forever, args=(home, info["swap_target"]), daemon=True).start()
    if hostile == "forge":
        threading.Thread(target=forge_forever, args=(snapshot,), daemon=True).start()
    if info.get("crash_after"):
        # A release that starts, answers, then dies: what a health probe is for.
        threading.Timer(info["crash_after"], lambda: os._exit(4)).start()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/status":
                self.send_error(404)
                return
            body = json.dumps(snapshot).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            path, _, query = self.path.partition("?")
            if path != "/toolrun":
                self.send_error(404)
                return
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            reply = toolrun(home, query, body)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    old = os.umask(0o177)
    server = Server(path, Handler)
    os.umask(old)
    os.chmod(path, 0o600)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("agent_cli %s serving %s" % (info["version"], path), flush=True)
    try:
        server.serve_forever()
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def main(argv):
    if argv[:2] != ["gateway", "run"]:
        print("usage: python -m agent_cli.main gateway run [--replace]", file=sys.stderr)
        return 2
    serve("cli")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
