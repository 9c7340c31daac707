#!/usr/bin/python3
"""A second, independent SFTP server for the tests: asyncssh's, on 127.0.0.1.

Usage: asyncssh_sftp.py HOST_KEY AUTHORIZED_KEYS PORT [rename-replaces]

It serves the machine's own filesystem (absolute paths, like OpenSSH's sftp-server) to any
user name that authenticates with a key in AUTHORIZED_KEYS, SFTP only (no shell, no exec).
Its semantics are asyncssh's own, which differ from OpenSSH's, and it is cut down further to
what a minimal SFTPv3 server offers:

- no extensions at all: no posix-rename@openssh.com, no hardlink@openssh.com, no
  statvfs@openssh.com / fstatvfs@openssh.com, no fsync@openssh.com (each is answered
  SSH_FX_OP_UNSUPPORTED, as is SFTPv6's LINK);
- plain SSH_FXP_RENAME refuses an existing target (SFTPv3 semantics; asyncssh checks with
  os.path.exists and then calls os.rename, so it is not atomic);
- SSH_FXP_SYMLINK takes its arguments in the order of the SFTP drafts (link path first),
  not OpenSSH's swapped order, for any client but OpenSSH's and paramiko's.

With `rename-replaces`, plain SSH_FXP_RENAME replaces an existing target instead (rename(2),
as some servers do against the SFTPv3 draft), for the test that kloset refuses such a server.

A bind failure prints "Address already in use" and exits 1, as sshd does, so the fixture
(tests/common/sshd.rs) picks another port.
"""

import asyncio
import errno
import os
import sys
import warnings

warnings.filterwarnings("ignore")  # cryptography's deprecations of ciphers nobody uses here

import asyncssh  # noqa: E402
from asyncssh import sftp  # noqa: E402

MISSING = (
    b"posix-rename@openssh.com",
    b"hardlink@openssh.com",
    b"statvfs@openssh.com",
    b"fstatvfs@openssh.com",
    b"fsync@openssh.com",
)

handler = sftp.SFTPServerHandler
handler._extensions = [e for e in handler._extensions if e[0] not in MISSING]
for name in MISSING + (sftp.FXP_LINK,):
    handler._packet_handlers.pop(name, None)


class MinimalSFTPServer(sftp.SFTPServer):
    """asyncssh's local-filesystem SFTP server without the operations removed above."""

    def _unsupported(self, *_args):
        raise sftp.SFTPOpUnsupported("not supported by this server")

    link = posix_rename = statvfs = fstatvfs = fsync = _unsupported


class ReplacingSFTPServer(MinimalSFTPServer):
    """The same, with a plain rename that replaces an existing target."""

    def rename(self, oldpath, newpath):
        os.replace(self.map_path(oldpath), self.map_path(newpath))


class KeyOnly(asyncssh.SSHServer):
    def begin_auth(self, username):
        return True

    def password_auth_supported(self):
        return False

    def kbdint_auth_supported(self):
        return False


async def main(host_key, authorized_keys, port, sftp_factory):
    try:
        await asyncssh.listen(
            "127.0.0.1",
            port,
            server_factory=KeyOnly,
            server_host_keys=[host_key],
            authorized_client_keys=authorized_keys,
            sftp_factory=sftp_factory,
            allow_scp=False,
            reuse_address=True,  # rebinds after a restart despite TIME_WAIT connections
        )
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            print(f"asyncssh_sftp: Address already in use (port {port})", file=sys.stderr)
            sys.exit(1)
        raise
    await asyncio.Event().wait()


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5) or sys.argv[4:] not in ([], ["rename-replaces"]):
        sys.exit("usage: asyncssh_sftp.py HOST_KEY AUTHORIZED_KEYS PORT [rename-replaces]")
    factory = ReplacingSFTPServer if sys.argv[4:] else MinimalSFTPServer
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), factory))
