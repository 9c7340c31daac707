#!/usr/bin/env python3
"""A misbehaving SFTP server for the tests: OpenSSH's sftp-server behind a relay that can lie.

sshd runs it as the sftp subsystem (`Subsystem sftp python3 hostile_sftp.py CTL`). The file
CTL/mode chooses what it does, read at every request so a test can switch it between commands
(every session also appends its process id to CTL/sessions, so a test can count them):

- empty or missing: relay every packet unchanged.
- `inject DIR TARGET`: the first READDIR reply (SSH_FXP_NAME) for the directory DIR gets extra
  entries: a second `.` and `..`, `a/b`, a 300-byte name, a name with a NUL byte, and a second
  `d` that is a symlink (READLINK of DIR/d answers TARGET).
- `drop ROOT`: a READDIR waits until some session has been asked for the attributes of ROOT
  (a backup stats its root, on another connection, while it starts listing; CTL/state =
  armed), then the session exits (the channel closes) and every later session exits at once
  (CTL/state = dead): the server is gone for good in the middle of the walk.
- `drop-read ROOT`: the same at the first OPEN (a file read) after ROOT was stat'ed.
- `silent ROOT`: like `drop ROOT`, but the session stops answering without ever closing the
  channel, and every later session does the same (CTL/state = silent). Such sessions give up
  after 120 s.
- `refuse`: every session exits at once, before SFTP's INIT is answered: a server whose SFTP
  subsystem cannot start.
- `refuse-write`: every WRITE is answered SSH_FX_FAILURE ("Failure") and not passed on, as
  OpenSSH's sftp-server answers a write that fails with EDQUOT (an exceeded disk quota),
  while its `statvfs@openssh.com` still shows the disk with room to spare.
- `refuse-write-once MARK [OFFSET]`: the first WRITE (of all sessions) to a file whose OPEN
  path contains MARK, at OFFSET or beyond (default 0), is answered SSH_FX_FAILURE, and that session then answers nothing more,
  without closing (CTL/state = refused; every other WRITE is passed on): a connection left
  out of step by a failed write, where anything still asked on it waits out the timeout.
- `refuse-write-deaf MARK [OFFSET]`: the same WRITE refused, after which that session reads
  every request and answers none (the answers of those already passed on still come):
  OpenSSH reading the requests after a WRITE libssh2 half sent as the rest of that WRITE.
  Unlike `refuse-write-once`, the client's own sending is never held up.
"""

import os
import struct
import subprocess
import sys
import threading
import time

CTL = sys.argv[1]
SERVER = "/usr/lib/openssh/sftp-server"

FXP_OPEN, FXP_LSTAT, FXP_OPENDIR, FXP_READDIR, FXP_STAT, FXP_READLINK = 3, 7, 11, 12, 17, 19
FXP_WRITE = 6
FXP_STATUS, FXP_HANDLE, FXP_NAME = 101, 102, 104
FX_FAILURE = 4

out_lock = threading.Lock()


def ctl(name):
    try:
        with open(os.path.join(CTL, name)) as f:
            return f.read().strip()
    except OSError:
        return ""


def set_state(state):
    tmp = os.path.join(CTL, "state.tmp")
    with open(tmp, "w") as f:
        f.write(state)
    os.rename(tmp, os.path.join(CTL, "state"))


def hang():
    """Never answer and never close: stdout stays open, stdin is not read."""
    time.sleep(120)
    os._exit(0)


def obey_state():
    state = ctl("state")
    if state == "dead":
        os._exit(1)
    if state == "silent":
        hang()


def wait_armed():
    """Wait (30 s at most) until the root was stat'ed, or the server is already down."""
    end = time.time() + 30
    while ctl("state") not in ("armed", "dead", "silent") and time.time() < end:
        time.sleep(0.02)


def read_exact(fd, n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def read_packet(fd):
    head = read_exact(fd, 4)
    if head is None:
        return None
    (n,) = struct.unpack(">I", head)
    return read_exact(fd, n)


def write_packet(fd, body):
    with out_lock:
        data = struct.pack(">I", len(body)) + body
        while data:
            data = data[os.write(fd, data):]


def string(b):
    return struct.pack(">I", len(b)) + b


def get_string(body, off):
    (n,) = struct.unpack(">I", body[off:off + 4])
    return body[off + 4:off + 4 + n], off + 4 + n


def attrs(perm, size):
    # SIZE | UIDGID | PERMISSIONS | ACMODTIME
    return struct.pack(">IQIIIII", 0xF, size, 0, 0, perm, 1700000000, 1700000000)


def injected():
    return [
        (b".", attrs(0o040755, 0)),
        (b"..", attrs(0o040755, 0)),
        (b"a/b", attrs(0o100644, 5)),
        (b"x" * 300, attrs(0o100644, 5)),
        (b"nul\x00name", attrs(0o100644, 5)),
        (b"d", attrs(0o120777, 4)),
    ]


opendir_ids = {}  # request id -> path
handles = {}  # handle -> path
open_ids = {}  # request id -> path (files)
file_handles = {}  # handle -> path (files)
readdir_ids = {}  # request id -> handle
done = set()  # handles already lied about
state_lock = threading.Lock()


def from_server(server_out, client_out):
    while True:
        body = read_packet(server_out)
        if body is None:
            os._exit(0)
        kind = body[0]
        mode = ctl("mode").split()
        if kind == FXP_HANDLE:
            (rid,) = struct.unpack(">I", body[1:5])
            handle, _ = get_string(body, 5)
            with state_lock:
                if rid in opendir_ids:
                    handles[handle] = opendir_ids.pop(rid)
                elif rid in open_ids:
                    file_handles[handle] = open_ids.pop(rid)
        elif kind == FXP_NAME and mode[:1] == ["inject"] and len(mode) >= 3:
            (rid,) = struct.unpack(">I", body[1:5])
            with state_lock:
                handle = readdir_ids.pop(rid, None)
                target = handles.get(handle) if handle is not None else None
                lie = target == mode[1].encode() and handle not in done
                if lie:
                    done.add(handle)
            if lie:
                (count,) = struct.unpack(">I", body[5:9])
                extra = injected()
                rest = b"".join(string(n) + string(b"") + a for n, a in extra)
                body = body[:5] + struct.pack(">I", count + len(extra)) + body[9:] + rest
        write_packet(client_out, body)


def main():
    with open(os.path.join(CTL, "sessions"), "a") as f:
        f.write(f"{os.getpid()}\n")
    if ctl("mode") == "refuse":
        os._exit(1)
    obey_state()
    server = subprocess.Popen([SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    client_in, client_out = 0, 1
    t = threading.Thread(
        target=from_server, args=(server.stdout.fileno(), client_out), daemon=True
    )
    t.start()
    deaf = False
    while True:
        body = read_packet(client_in)
        if body is None:
            server.stdin.close()
            server.wait()
            t.join(5)
            os._exit(0)
        obey_state()
        if deaf:
            continue
        kind = body[0]
        mode = ctl("mode").split()
        if mode[:1] in (["drop"], ["drop-read"], ["silent"]) and len(mode) >= 2:
            if kind in (FXP_LSTAT, FXP_STAT) and get_string(body, 5)[0] == mode[1].encode():
                set_state("armed")
            elif kind == FXP_READDIR and mode[0] in ("drop", "silent"):
                wait_armed()
                if mode[0] == "drop":
                    set_state("dead")
                    os._exit(1)
                set_state("silent")
                hang()
            elif kind == FXP_OPEN and mode[0] == "drop-read" and ctl("state") == "armed":
                set_state("dead")
                os._exit(1)
        if len(body) >= 5:
            (rid,) = struct.unpack(">I", body[1:5])
            if kind == FXP_OPENDIR:
                path, _ = get_string(body, 5)
                with state_lock:
                    opendir_ids[rid] = path
            elif kind == FXP_OPEN and mode[:1] in (["refuse-write-once"], ["refuse-write-deaf"]):
                path, _ = get_string(body, 5)
                with state_lock:
                    open_ids[rid] = path
            elif kind == FXP_READDIR:
                handle, _ = get_string(body, 5)
                with state_lock:
                    readdir_ids[rid] = handle
            elif (
                kind == FXP_WRITE
                and mode[:1] in (["refuse-write-once"], ["refuse-write-deaf"])
                and len(mode) >= 2
                and ctl("state") != "refused"
            ):
                handle, off = get_string(body, 5)
                (offset,) = struct.unpack(">Q", body[off:off + 8])
                with state_lock:
                    path = file_handles.get(handle, b"")
                least = int(mode[2]) if len(mode) >= 3 else 0
                if mode[1].encode() in path and offset >= least:
                    set_state("refused")
                    reply = struct.pack(">BII", FXP_STATUS, rid, FX_FAILURE)
                    reply += string(b"Failure") + string(b"")
                    write_packet(client_out, reply)
                    if mode[0] == "refuse-write-once":
                        hang()
                    deaf = True
                    continue
            elif kind == FXP_WRITE and mode[:1] == ["refuse-write"]:
                reply = struct.pack(">BII", FXP_STATUS, rid, FX_FAILURE)
                reply += string(b"Failure") + string(b"")
                write_packet(client_out, reply)
                continue
            elif kind == FXP_READLINK and mode[:1] == ["inject"] and len(mode) >= 3:
                path, _ = get_string(body, 5)
                if path == mode[1].encode() + b"/d":
                    reply = struct.pack(">BII", FXP_NAME, rid, 1)
                    reply += string(mode[2].encode()) + string(b"") + struct.pack(">I", 0)
                    write_packet(client_out, reply)
                    continue
        server.stdin.write(struct.pack(">I", len(body)) + body)
        server.stdin.flush()


main()
