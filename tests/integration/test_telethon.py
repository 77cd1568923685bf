#!/usr/bin/python3
"""
test_telethon - an independent Telegram client (Telethon) talks to mtproxy.

Starts the fake Telegram middle proxy (FAKE_MIDDLE_BIN, echoes every RPC_PROXY_REQ back as
RPC_PROXY_ANS) and the real mtproxy (MTPROXY_BIN) pointed at it, then uses Telethon's own
MTProxy connection classes (abridged, intermediate, randomized intermediate with a "dd"
secret) to send MTProto-shaped packets through the proxy and checks that Telethon decodes
exactly the same bytes coming back. A client with a wrong secret must get nothing back.

Run with the Debian python (/usr/bin/python3) and python3-telethon; stdlib + telethon only.
"""
import asyncio
import inspect
import logging
import os
import queue
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

from telethon.network.connection.tcpmtproxy import (
    ConnectionTcpMTProxyAbridged,
    ConnectionTcpMTProxyIntermediate,
    ConnectionTcpMTProxyRandomizedIntermediate,
)

START_TIMEOUT = 20.0     # seconds for a process to say it is listening
CONNECT_TIMEOUT = 15.0   # Telethon's MTProxy connect() itself waits 2 s for an early EOF
RECV_TIMEOUT = 30.0      # one echoed packet (512 KiB through two hops) must be back by then
WRONG_SECRET_WAIT = 4.0  # a wrong-secret client must get nothing during this time
STOP_TIMEOUT = 10.0

SIZES = (40, 4096, 512 * 1024)
BURST = 10
DCS = (2, 4, -2)

# RPC_PROXY_REQ flags (docs/PROTOCOLS.md)
FLAG_NOT_ENCRYPTED = 0x2
FLAG_INTERMEDIATE = 0x20000000
FLAG_ABRIDGED = 0x40000000

passed = 0
failed = 0


class CheckFailed(Exception):
    pass


def check(cond, msg=""):
    """Tiny assert helper: raises with file:line so the case is reported as failed."""
    if not cond:
        fr = inspect.stack()[1]
        raise CheckFailed("%s:%d: check failed: %s" % (os.path.basename(fr.filename), fr.lineno, msg))


def record(name, err):
    global passed, failed
    if err is None:
        passed += 1
        print("ok   %s" % name, flush=True)
    else:
        failed += 1
        print("FAIL %s: %s" % (name, err), flush=True)


# ---------------------------------------------------------------- processes


class Proc:
    """A child process whose merged stdout/stderr is read line by line by a daemon thread."""

    def __init__(self, name, argv):
        self.name = name
        self.lines = []            # every line, for diagnostics
        self.queue = queue.Queue()  # every line, consumed by wait_line
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        self.t = threading.Thread(target=self._reader, daemon=True)
        self.t.start()

    def _reader(self):
        for raw in iter(self.p.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            self.queue.put(line)
        self.queue.put(None)  # EOF

    def wait_line(self, regex, timeout):
        """Returns the match of the first new line matching regex, or None on timeout/EOF."""
        pat = re.compile(regex)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                line = self.queue.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:
                return None
            m = pat.search(line)
            if m:
                return m

    def stop(self):
        """SIGTERM, bounded wait, SIGKILL if needed. Returns the exit code."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print("%s did not stop within %.0f s; killing pid %d" % (self.name, STOP_TIMEOUT, self.p.pid))
                self.p.kill()
                self.p.wait(timeout=STOP_TIMEOUT)
        self.t.join(timeout=STOP_TIMEOUT)
        return self.p.returncode

    def dump(self, last=40):
        print("---- last %d lines of %s (pid %d) ----" % (last, self.name, self.p.pid))
        for line in self.lines[-last:]:
            print("  " + line)


def wait_file_complete(path, marker, timeout):
    """The fake writes its config after it says it is listening: wait for the last line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, "r") as f:
                if marker in f.read():
                    return True
        except FileNotFoundError:
            pass
        time.sleep(0.02)  # bounded poll on a condition, not a synchronisation sleep
    return False


# ---------------------------------------------------------------- Telethon side


class _Loggers(dict):
    """What Telethon's Connection expects as `loggers`: loggers[__name__] -> a logger."""

    def __missing__(self, key):
        return logging.getLogger(key)


LOGGERS = _Loggers()


def make_packet(size, seq):
    """An unencrypted MTProto message: auth_key_id 0, msg_id, length, body (size % 4 == 0)."""
    assert size % 4 == 0 and size >= 20
    msg_id = ((int(time.time() * (1 << 32)) & ~3) + seq * 4) & ((1 << 64) - 1)
    body = os.urandom(size - 20)
    return b"\0" * 8 + struct.pack("<QI", msg_id, len(body)) + body


async def open_conn(cls, port, dc, secret_hex):
    conn = cls("127.0.0.1", port, dc, loggers=LOGGERS, proxy=("127.0.0.1", port, secret_hex))
    await asyncio.wait_for(conn.connect(timeout=CONNECT_TIMEOUT), CONNECT_TIMEOUT + 5)
    return conn


async def echo_case(cls, port, dc, secret_hex):
    """Connect, round-trip every size, then a burst; returns the number of packets sent."""
    conn = await open_conn(cls, port, dc, secret_hex)
    sent = 0
    try:
        for i, size in enumerate(SIZES):
            pkt = make_packet(size, i)
            await asyncio.wait_for(conn.send(pkt), RECV_TIMEOUT)
            sent += 1
            try:
                got = await asyncio.wait_for(conn.recv(), RECV_TIMEOUT)
            except asyncio.TimeoutError:
                got = None
            except ConnectionError as e:
                raise CheckFailed("size %d: connection closed before the echo came back (%s)" % (size, e))
            check(got is not None, "size %d: no echo within %.0f s" % (size, RECV_TIMEOUT))
            check(len(got) == len(pkt), "size %d: echo is %d bytes" % (size, len(got)))
            if got != pkt:
                at = next(k for k in range(len(pkt)) if got[k] != pkt[k])
                check(False, "size %d: echo differs from byte %d (sent %s, got %s)"
                      % (size, at, pkt[at:at + 8].hex(), got[at:at + 8].hex()))
        # Pipelined: several packets in flight, echoed in order.
        burst = [make_packet(40 + 4 * k, 100 + k) for k in range(BURST)]
        for pkt in burst:
            await asyncio.wait_for(conn.send(pkt), RECV_TIMEOUT)
            sent += 1
        for k, pkt in enumerate(burst):
            try:
                got = await asyncio.wait_for(conn.recv(), RECV_TIMEOUT)
            except asyncio.TimeoutError:
                got = None
            except ConnectionError as e:
                raise CheckFailed("burst %d: connection closed (%s)" % (k, e))
            check(got == pkt, "burst packet %d: echo differs (%s)" % (k, None if got is None else len(got)))
    finally:
        await conn.disconnect()
    return sent


async def wrong_secret_case(cls, port, dc, secret_hex):
    """A client with a wrong secret must receive nothing. Returns a description of the outcome."""
    try:
        conn = await open_conn(cls, port, dc, secret_hex)
    except ConnectionError as e:
        return "closed during connect (%s)" % e
    try:
        try:
            await asyncio.wait_for(conn.send(make_packet(40, 0)), WRONG_SECRET_WAIT)
        except (ConnectionError, asyncio.TimeoutError) as e:
            return "send refused (%s)" % type(e).__name__
        try:
            got = await asyncio.wait_for(conn.recv(), WRONG_SECRET_WAIT)
        except asyncio.TimeoutError:
            return "nothing received in %.0f s" % WRONG_SECRET_WAIT
        except ConnectionError:
            return "connection closed, nothing received"
        check(False, "a wrong-secret client received %d bytes: %s" % (len(got), got[:16].hex()))
    finally:
        await conn.disconnect()


# ---------------------------------------------------------------- main


CLASSES = (
    ("abridged", ConnectionTcpMTProxyAbridged, ""),
    ("intermediate", ConnectionTcpMTProxyIntermediate, ""),
    ("secure", ConnectionTcpMTProxyRandomizedIntermediate, "dd"),
)


async def run_cases(port, secret_hex):
    total_sent = 0
    names, coros = [], []
    for cname, cls, prefix in CLASSES:
        for dc in DCS:
            names.append("echo %s dc %d" % (cname, dc))
            coros.append(echo_case(cls, port, dc, prefix + secret_hex))
    # All connections at once: also checks that the proxy keeps them apart.
    results = await asyncio.wait_for(asyncio.gather(*coros, return_exceptions=True), 240)
    for name, res in zip(names, results):
        if isinstance(res, BaseException):
            record(name, "%s: %s" % (type(res).__name__, res))
        else:
            total_sent += res
            record(name, None)

    wrong = bytes(b ^ 0x5a for b in bytes.fromhex(secret_hex)).hex()
    names = ["wrong secret %s" % cname for cname, _, _ in CLASSES]
    coros = [wrong_secret_case(cls, port, 2, prefix + wrong) for _, cls, prefix in CLASSES]
    results = await asyncio.wait_for(asyncio.gather(*coros, return_exceptions=True), 60)
    for name, res in zip(names, results):
        if isinstance(res, BaseException):
            record(name, "%s: %s" % (type(res).__name__, res))
        else:
            print("     (%s: %s)" % (name, res))
            record(name, None)
    return total_sent


def check_fake_summary(fake, total_sent):
    """After SIGTERM the fake prints what it saw: the packets went through the RPC path."""
    name = "fake middle saw the packets"
    try:
        m = fake.wait_line(r"proxy_reqs (\d+) proxy_ans (\d+)", STOP_TIMEOUT)
        check(m is not None, "no summary line from fake_middle")
        reqs, ans = int(m.group(1)), int(m.group(2))
        check(reqs >= total_sent, "fake got %d RPC_PROXY_REQ, %d packets were echoed" % (reqs, total_sent))
        check(ans >= total_sent, "fake sent %d RPC_PROXY_ANS for %d packets" % (ans, total_sent))
        flags = []
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            c = fake.wait_line(r"conn_id [0-9a-f]+ flags 0x([0-9a-f]+) packets (\d+)", 1.0)
            if c is None:
                break
            flags.append(int(c.group(1), 16))
        n_abr = sum(1 for f in flags if f & FLAG_ABRIDGED)
        n_int = sum(1 for f in flags if f & FLAG_INTERMEDIATE)
        check(n_abr >= len(DCS), "%d conn_ids with the ABRIDGED flag, want >= %d" % (n_abr, len(DCS)))
        check(n_int >= 2 * len(DCS), "%d conn_ids with the INTERMEDIATE flag, want >= %d" % (n_int, 2 * len(DCS)))
        check(all(f & FLAG_NOT_ENCRYPTED for f in flags if f & (FLAG_ABRIDGED | FLAG_INTERMEDIATE)),
              "auth_key_id 0 packets must carry NOT_ENCRYPTED: %s" % [hex(f) for f in flags])
        record(name, None)
    except CheckFailed as e:
        record(name, str(e))


def main():
    logging.basicConfig(level=logging.WARNING, format="telethon: %(name)s: %(message)s")
    mtproxy_bin = os.environ.get("MTPROXY_BIN")
    fake_bin = os.environ.get("FAKE_MIDDLE_BIN")
    if not mtproxy_bin or not fake_bin:
        print("MTPROXY_BIN and FAKE_MIDDLE_BIN must name the binaries")
        return 1

    secret_hex = os.urandom(16).hex()
    fake = proxy = None
    total_sent = None
    with tempfile.TemporaryDirectory(prefix="mtp-telethon-") as tmp:
        psecret = os.path.join(tmp, "proxy-secret")
        pconfig = os.path.join(tmp, "proxy-config")
        with open(psecret, "wb") as f:
            f.write(os.urandom(128))
        try:
            fake = Proc("fake_middle", [fake_bin, "--secret-file", psecret, "--port", "0",
                                        "--config-out", pconfig])
            m = fake.wait_line(r"listening on 127\.0\.0\.1:(\d+)", START_TIMEOUT)
            check(m is not None, "fake_middle did not start")
            check(wait_file_complete(pconfig, "default 2;", START_TIMEOUT), "fake_middle wrote no config")

            proxy = Proc("mtproxy", [mtproxy_bin, "--listen", "127.0.0.1:0", "--secret", secret_hex,
                                     "--proxy-secret", psecret, "--proxy-config", pconfig,
                                     "--workers", "1"])
            m = proxy.wait_line(r"listener l0 listening on 127\.0\.0\.1:(\d+)", START_TIMEOUT)
            check(m is not None, "mtproxy did not report 'listener l0 listening on 127.0.0.1:PORT'")
            port = int(m.group(1))
            print("fake_middle pid %d, mtproxy pid %d on port %d" % (fake.p.pid, proxy.p.pid, port), flush=True)

            total_sent = asyncio.run(run_cases(port, secret_hex))
        except CheckFailed as e:
            record("setup", str(e))
        except Exception as e:  # noqa: BLE001
            record("run", "%s: %s" % (type(e).__name__, e))
        finally:
            if proxy is not None:
                rc = proxy.stop()
                if rc not in (0, -signal.SIGTERM):
                    record("mtproxy exit", "exit status %s after SIGTERM" % rc)
            if fake is not None:
                fake.stop()
                if total_sent is not None:
                    check_fake_summary(fake, total_sent)
            if failed:
                if proxy is not None:
                    proxy.dump()
                if fake is not None:
                    fake.dump()

    print("%d passed, %d failed" % (passed, failed))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
