"""``oncoseg-node users add | passwd | remove | list``: the HTTP pages' local accounts.

The accounts file is ``http.auth.users_file`` of the node config. A password
is read from a prompt on a terminal (twice, not echoed) or as the first line
of standard input for scripts, never from an argument (arguments show in
``ps`` and in shell history). The running node picks up every change at its
next sign-in.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from oncoseg_node.config import ROLES, load_config
from oncoseg_node.errors import OncosegError

if TYPE_CHECKING:
    from oncoseg_node.ops.users import Account

# The account store (argon2 and its cffi) is imported by the commands that use it, not
# by every command line that builds the parser.


def _users_file(args: argparse.Namespace) -> Path:
    path = load_config(args.config).http.auth.users_file
    if path is None:
        raise OncosegError(f"{args.config}: http.auth.users_file is not set; set it to the "
                           "accounts file the node should read")
    return path


def read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Password again: ") != first:
            raise OncosegError("the two passwords differ; nothing changed")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def _change(args: argparse.Namespace, change: Callable[[dict[str, Account]], str]) -> int:
    """Read the accounts, let ``change`` edit them and say what it did, write them back."""
    from oncoseg_node.ops import users

    path = _users_file(args)
    accounts = users.read_accounts(path)
    done = change(accounts)
    users.write_accounts(path, accounts)
    print(done)
    return 0


def cmd_users_add(args: argparse.Namespace) -> int:
    from oncoseg_node.ops.users import Account, check_name, check_role, hash_password

    def add(accounts: dict[str, Account]) -> str:
        name, role = check_name(args.name), check_role(args.role)
        if name in accounts:
            raise OncosegError(f"account {name!r} exists; change it with `users passwd`")
        accounts[name] = Account(name, role, hash_password(read_password()))
        return f"added {name} ({role})"

    return _change(args, add)


def cmd_users_passwd(args: argparse.Namespace) -> int:
    from oncoseg_node.ops.users import Account, check_role, hash_password

    def passwd(accounts: dict[str, Account]) -> str:
        old = accounts.get(args.name)
        if old is None:
            raise OncosegError(f"no account {args.name!r}")
        role = check_role(args.role) if args.role else old.role
        accounts[old.name] = Account(old.name, role, hash_password(read_password()))
        return f"new password for {old.name} ({role})"

    return _change(args, passwd)


def cmd_users_remove(args: argparse.Namespace) -> int:
    def remove(accounts: dict[str, Account]) -> str:
        if accounts.pop(args.name, None) is None:
            raise OncosegError(f"no account {args.name!r}")
        return f"removed {args.name}; their sessions end at their next request"

    return _change(args, remove)


def cmd_users_list(args: argparse.Namespace) -> int:
    from oncoseg_node.ops.users import read_accounts

    for account in sorted(read_accounts(_users_file(args)).values(), key=lambda a: a.name):
        print(f"{account.name}\t{account.role}")
    return 0


def add_users_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                     config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("users", help="local accounts for the HTTP pages")
    usub = p.add_subparsers(dest="users_command", required=True)
    q = usub.add_parser("add", help="add an account (password from a prompt or stdin)")
    q.add_argument("name")
    q.add_argument("--role", required=True, choices=ROLES)
    config_arg(q)
    q.set_defaults(func=cmd_users_add)
    q = usub.add_parser("passwd", help="set an account's password (and role)")
    q.add_argument("name")
    q.add_argument("--role", choices=ROLES, help="also change the role")
    config_arg(q)
    q.set_defaults(func=cmd_users_passwd)
    q = usub.add_parser("remove", help="remove an account")
    q.add_argument("name")
    config_arg(q)
    q.set_defaults(func=cmd_users_remove)
    q = usub.add_parser("list", help="accounts and their roles")
    config_arg(q)
    q.set_defaults(func=cmd_users_list)
