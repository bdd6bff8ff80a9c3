"""``threatgate users add|remove|list``: edit the ``<Users>`` of a node or balancer config file as text.

A node's users are in ``<HTTPServer><Users>`` (its REST API); a balancer's in ``<Config><Users>`` (its
operator console, balancer/console.py).  The root element tells which (:func:`container`).

Rules:
1. The file is edited as text, not re-serialised from a tree, so comments, blank lines and
   attribute quoting survive.  Comments, CDATA and processing instructions are blanked out (same
   length) before searching, so a commented-out ``<HTTPServer>`` or ``<User>`` is never edited.
2. The edit is written with :func:`threatgate.fs.write_atomic` (a temporary file beside the original,
   with the original's mode and owner, fsynced), checked there (the new text parses and holds exactly
   the intended change) and only then renamed over the original; a file that changed meanwhile is
   left alone.  A symlink's target is edited.
3. A cluster member's users are not in its file (they come from the cluster settings), so an edit
   there would never take effect: it is refused before anything is written (:func:`refuse_cluster_member`).
4. A running node re-reads its users when the file changes (:class:`threatgate.node.auth.NodeUsers`),
   so nothing has to be signalled.

The text edits (:func:`upsert_user`, :func:`delete_user`) are pure; :func:`store_user` and
:func:`drop_user` do the file I/O around them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from xml.sax.saxutils import unescape

from threatgate.config.common import parse_bool
from threatgate.config.xml import Node, read_xml
from threatgate.errors import ConfigError
from threatgate.fs import write_atomic

_ATTRS = r"""(?:[^>"']|"[^"]*"|'[^']*')*?"""
_MASKED = re.compile(r"<!--.*?-->|<!\[CDATA\[.*?\]\]>|<\?.*?\?>", re.S)
_ATTR = re.compile(r"""([\w:.-]+)\s*=\s*(?:"([^"]*)"|'([^']*)')""")
_USER = re.compile(rf"<User\b({_ATTRS})(?:/>|>.*?</User\s*>)", re.S)


# -- reading ------------------------------------------------------------------------------------------


BALANCER_ROOT = "Config"
"""The root element of a balancer config (a node's is ``<Configuration>``)."""


def container(root: Node) -> str:
    """The element that holds ``<Users>``: ``<HTTPServer>`` in a node config, the root ``<Config>`` in a balancer's."""
    return BALANCER_ROOT if root.tag == BALANCER_ROOT else "HTTPServer"


def _users_node(root: Node) -> Node | None:
    holder = root if root.tag == BALANCER_ROOT else root.only("HTTPServer")
    return holder.only("Users") if holder is not None else None


def file_users(root: Node) -> list[str]:
    """The user names in the ``<Users>`` of a parsed node or balancer config, in file order."""
    users = _users_node(root)
    return [u.attrs.get("name", "") for u in users.findall("User")] if users is not None else []


def refuse_cluster_member(root: Node, path: str, command: str, *, edit: bool = True) -> None:
    """Raise ConfigError when ``path`` configures a cluster member: its users live in the cluster settings.

    ``command`` is the ``threatgate cluster users ...`` command to run instead (it goes in the message);
    ``edit``: the refused command would have changed the file.
    """
    cluster = root.only("Cluster")
    if cluster is not None and parse_bool(cluster, "enabled", True):
        unchanged = ", so the file was not changed" if edit else ""
        raise ConfigError(
            path,
            cluster.line,
            "Cluster",
            "this node is a cluster member: its API users come from the cluster settings, not from this file"
            f"{unchanged}; use: {command}",
        )


# -- pure text edits ----------------------------------------------------------------------------------


def _masked(text: str) -> str:
    return _MASKED.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), text)


def _users_span(
    masked: str, holder: str = "HTTPServer"
) -> tuple[re.Match[str], re.Match[str] | None, re.Match[str] | None, re.Match[str] | None]:
    """The ``holder`` start tag, its end tag, and ``<Users>``'s start and end tags (None: absent/self-closed).

    In a balancer config (``holder`` ``Config``) only a ``<Users>`` that is a direct child of the root counts.
    """
    server = re.compile(rf"<{holder}\b{_ATTRS}(/?)>").search(masked)
    if server is None:
        raise ValueError(f"cannot find the <{holder}> start tag")
    if server.group(1):
        return server, None, None, None
    server_close = re.compile(rf"</{holder}\s*>").search(masked, server.end())
    if server_close is None:
        raise ValueError(f"cannot find </{holder}>")
    users = re.compile(rf"<Users\b{_ATTRS}(/?)>").search(masked, server.end(), server_close.start())
    if users is None or users.group(1):
        return server, server_close, users, None
    users_close = re.compile(r"</Users\s*>").search(masked, users.end(), server_close.start())
    if users_close is None:
        raise ValueError(f"cannot find </Users> inside <{holder}>")
    return server, server_close, users, users_close


def _user_elements(text: str, masked: str, start: int, end: int) -> list[tuple[re.Match[str], str | None]]:
    """Each ``<User>`` element between ``start`` and ``end`` with its name attribute."""
    found = []
    for user in _USER.finditer(masked, start, end):
        attrs = {
            m.group(1): unescape(m.group(2) or m.group(3) or "", {"&quot;": '"', "&apos;": "'"})
            for m in _ATTR.finditer(text, user.start(1), user.end(1))
        }
        found.append((user, attrs.get("name")))
    return found


def upsert_user(text: str, name: str, element: str, holder: str = "HTTPServer") -> tuple[str, bool]:
    """``text`` with ``element`` replacing user ``name``'s element, or added to <Users>; True if replaced.

    Raises ValueError when the tags cannot be found in the text (the XML parser found them, so only
    for layouts this simple scanner does not understand).
    """
    masked = _masked(text)
    nl = "\r\n" if "\r\n" in text else "\n"
    unit_match = re.search(r"^([ \t]+)<", masked, re.M)
    unit = unit_match.group(1) if unit_match else "  "
    server, server_close, users, users_close = _users_span(masked, holder)
    if server_close is None:
        return _add_children(text, holder, server, None, ["<Users>", unit + element, "</Users>"], nl, unit), False
    if users is None:
        lines = ["<Users>", unit + element, "</Users>"]
        return _add_children(text, holder, server, server_close.start(), lines, nl, unit), False
    if users_close is None:
        return _add_children(text, "Users", users, None, [element], nl, unit), False
    child_indent = None
    for user, user_name in _user_elements(text, masked, users.end(), users_close.start()):
        if user_name == name:
            return text[: user.start()] + element + text[user.end() :], True
        if not text[text.rfind("\n", 0, user.start()) + 1 : user.start()].strip():
            child_indent = _line_indent(text, user.start())  # line up with the existing users
    return _add_children(text, "Users", users, users_close.start(), [element], nl, unit, child_indent), False


def delete_user(text: str, name: str, holder: str = "HTTPServer") -> str:
    """``text`` without user ``name``'s element (and without its line when it stood alone on one).

    Raises:
        KeyError: no such user in ``<HTTPServer><Users>``.
        ValueError: the tags cannot be found in the text (see :func:`upsert_user`).
    """
    masked = _masked(text)
    _, _, users, users_close = _users_span(masked, holder)
    if users is None or users_close is None:
        raise KeyError(name)
    for user, user_name in _user_elements(text, masked, users.end(), users_close.start()):
        if user_name != name:
            continue
        start, end = user.start(), user.end()
        line_start = text.rfind("\n", 0, start) + 1
        line_end = text.find("\n", end)
        line_end = len(text) if line_end < 0 else line_end + 1
        if not text[line_start:start].strip() and not text[end:line_end].strip():
            start, end = line_start, line_end  # the whole line, indentation and line ending included
        return text[:start] + text[end:]
    raise KeyError(name)


def _line_indent(text: str, pos: int) -> str:
    start = text.rfind("\n", 0, pos) + 1
    match = re.match(r"[ \t]*", text[start:pos])
    return match.group() if match else ""


def _add_children(
    text: str,
    tag: str,
    opening: re.Match[str],
    close_start: int | None,
    lines: list[str],
    nl: str,
    unit: str,
    child_indent: str | None = None,
) -> str:
    """Insert ``lines`` as the last children of the element opened by ``opening``, indented one level."""
    base = _line_indent(text, opening.start())
    indent = child_indent if child_indent is not None else base + unit
    body = "".join(indent + line + nl for line in lines)
    if close_start is None:  # <Tag .../>: open it up
        head = text[opening.start() : opening.end() - 2].rstrip() + ">"
        return text[: opening.start()] + head + nl + body + base + f"</{tag}>" + text[opening.end() :]
    line_start = text.rfind("\n", 0, close_start) + 1
    if not text[line_start:close_start].strip():
        return text[:line_start] + body + text[line_start:]
    return text[:close_start] + nl + body + base + text[close_start:]


# -- file I/O ---------------------------------------------------------------------------------------------


def store_user(path: str, name: str, password_hash: str, cluster_command: str) -> bool:
    """Put ``<User name=NAME password_hash=.../>`` into the node or balancer config at ``path``.

    Returns True when the user existed (its password was replaced).

    Raises:
        ConfigError: the file is not well-formed, configures a cluster member, has no <HTTPServer>,
            or the edit would break it.
        FileWriteError: the new file cannot be written (OSError: the old one cannot be read).
    """
    root = read_xml(path)
    refuse_cluster_member(root, path, cluster_command)
    holder = container(root)
    if holder == "HTTPServer" and root.only("HTTPServer") is None:
        raise ConfigError(
            path,
            0,
            "",
            "no <HTTPServer> element: add one inside <Configuration> (see docs/configuration.md), then retry",
        )
    element = f'<User name="{name}" password_hash="{password_hash}"/>'
    updated: list[bool] = []

    def edit(text: str) -> str:
        new_text, existed = upsert_user(text, name, element, holder)
        updated.append(existed)
        return new_text

    def check(new_root: Node) -> None:
        users_node = _users_node(new_root)
        found = [
            u for u in (users_node.findall("User") if users_node is not None else ()) if u.attrs.get("name") == name
        ]
        if len(found) != 1 or found[0].attrs.get("password_hash") != password_hash:
            problem = f"user {name!r} appears {len(found)} times in <Users>" if len(found) > 1 else ""
            raise ConfigError(path, 0, "", problem or "could not place the <User> element; add it by hand")

    _replace_file(path, edit, check)
    return updated[0]


def drop_user(path: str, name: str, cluster_command: str) -> None:
    """Remove user ``name`` from the node or balancer config at ``path``.

    Raises:
        ConfigError: the file is not well-formed, configures a cluster member, has no such user, or
            the edit would break it.
        FileWriteError: the new file cannot be written (OSError: the old one cannot be read).
    """
    root = read_xml(path)
    refuse_cluster_member(root, path, cluster_command)
    holder = container(root)
    if name not in file_users(root):
        where = "<HTTPServer><Users>" if holder == "HTTPServer" else "<Users>"
        raise ConfigError(path, 0, "", f"no user {name!r} in {where} (threatgate users list --config ...)")

    def edit(text: str) -> str:
        try:
            return delete_user(text, name, holder)
        except KeyError:
            raise ValueError(f"cannot find user {name!r} in the text") from None

    def check(new_root: Node) -> None:
        if name in file_users(new_root) or len(file_users(new_root)) != len(file_users(root)) - 1:
            raise ConfigError(path, 0, "", f"could not remove user {name!r}; remove the <User> element by hand")

    _replace_file(path, edit, check)


def _replace_file(path: str, edit: Callable[[str], str], check: Callable[[Node], None]) -> None:
    """Apply the text ``edit`` to ``path`` atomically, after ``check`` accepted the parsed result."""
    real = os.path.realpath(path)  # edit a symlink's target, do not replace the link with a file
    before = os.stat(real)
    try:
        with open(real, "rb") as fh:
            text = fh.read().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(path, 0, "", "not UTF-8: cannot edit it as text") from None
    try:
        new_text = edit(text)
    except ValueError as exc:
        raise ConfigError(path, 0, "HTTPServer", f"{exc}; edit the <Users> element by hand") from None

    def before_replace(tmp: str) -> None:
        try:
            check(read_xml(tmp))
        except ConfigError as exc:  # read_xml names the temp file; the operator knows only the real one
            raise ConfigError(path, exc.line, exc.element, exc.problem) from None
        now = os.stat(real)
        if (now.st_ino, now.st_size, now.st_mtime_ns) != (before.st_ino, before.st_size, before.st_mtime_ns):
            raise ConfigError(path, 0, "", "the file changed while it was being edited; run the command again")

    # The original's mode and owner: a root-run edit stays readable by the service.
    owner = (before.st_uid, before.st_gid)
    write_atomic(real, new_text.encode("utf-8"), before.st_mode & 0o7777, owner=owner, before_replace=before_replace)
