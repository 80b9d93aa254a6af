"""The .s3curl credentials file: s3curl's Perl, read without running Perl.

The file is the one operators already keep for s3curl::

    %awsSecretAccessKeys = (
        ganymede => { id => 'AKIA...', key => '...', },   # backups
    );
    push @endpoints , 'cloudfiles.example.com';

Only that subset of Perl is understood (literals, barewords, `=>`, commas, brackets, comments); anything else
is refused with its line. Error messages describe tokens by kind and never quote a string literal, so a secret
key cannot leak through them.
"""
import os
import re
from dataclasses import dataclass, field

from . import files
from .errors import S3CredentialsError


@dataclass(frozen=True)
class Credentials:
    """One profile's access key id and secret key; the repr (and str) leaves the secret out."""

    id: str
    key: str = field(repr=False)


@dataclass(frozen=True)
class S3curlFile:
    """What a .s3curl file says: profiles by name, and the extra endpoints listed."""

    profiles: dict
    endpoints: tuple = ()


_PUNCT = re.compile(r"=>|[(){},;=]")
_BAREWORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_VARIABLE = re.compile(r"[%@$][A-Za-z_][A-Za-z0-9_]*")
_SINGLE_ESCAPES = {"\\": "\\", "'": "'"}
_DOUBLE_ESCAPES = {"\\": "\\", '"': '"', "$": "$", "@": "@", "n": "\n", "t": "\t"}


@dataclass(frozen=True)
class _Token:
    kind: str  # 'string', 'word', 'var', 'punct', 'eof'
    text: str
    line: int

    def describe(self):
        """Name the token for an error message without quoting a string's value."""
        return {"string": "a quoted string", "word": "a bare word", "eof": "the end of the file"}.get(
            self.kind, repr(self.text))


def _tokens(text):
    pos, line, end = 0, 1, len(text)
    while pos < end:
        char = text[pos]
        if char.isspace():
            line += char == "\n"
            pos += 1
        elif char == "#":
            newline = text.find("\n", pos)
            pos = end if newline < 0 else newline
        elif char in "'\"":
            value, newpos = _string(text, pos, line)
            yield _Token("string", value, line)
            line += text.count("\n", pos, newpos)
            pos = newpos
        elif match := _PUNCT.match(text, pos) or _VARIABLE.match(text, pos) or _BAREWORD.match(text, pos):
            kind = {_PUNCT: "punct", _VARIABLE: "var", _BAREWORD: "word"}[match.re]
            yield _Token(kind, match.group(), line)
            pos = match.end()
        else:
            column = pos - text.rfind("\n", 0, pos)
            raise S3CredentialsError(f"unexpected character at line {line}, column {column}")
    yield _Token("eof", "", line)


def _string(text, start, line):
    """Read a quoted literal at `start`; return (value, position after it)."""
    quote = text[start]
    escapes = _SINGLE_ESCAPES if quote == "'" else _DOUBLE_ESCAPES
    out, pos = [], start + 1
    while pos < len(text):
        char = text[pos]
        if char == quote:
            return "".join(out), pos + 1
        if char == "\\" and pos + 1 < len(text):
            nxt = text[pos + 1]
            if nxt in escapes:
                out.append(escapes[nxt])
                pos += 2
                continue
            if quote == '"':
                raise S3CredentialsError(f"unsupported escape in a double-quoted string at line {line}")
        elif quote == '"' and char in "$@":
            raise S3CredentialsError(
                f"double-quoted string at line {line} contains '{char}', which Perl would interpolate: "
                "use single quotes")
        out.append(char)
        pos += 1
    raise S3CredentialsError(f"unterminated quoted string starting at line {line}")


class _Parser:
    """Recursive descent over the token stream; one method per construct."""

    def __init__(self, text):
        self._tokens = list(_tokens(text))
        self._pos = 0
        self.profiles = None
        self.endpoints = []

    @property
    def tok(self):
        return self._tokens[self._pos]

    def _next(self):
        token = self.tok
        if token.kind != "eof":
            self._pos += 1
        return token

    def _accept(self, text):
        if self.tok.kind in ("punct", "word", "var") and self.tok.text == text:
            return self._next()
        return None

    def _expect(self, text, context):
        if not self._accept(text):
            self._fail(f"expected '{text}' {context}")

    def _fail(self, what):
        raise S3CredentialsError(f"{what} at line {self.tok.line}, found {self.tok.describe()}")

    def _string_value(self, context):
        if self.tok.kind != "string":
            self._fail(f"expected a quoted string {context}")
        return self._next().text

    def file(self):
        while self.tok.kind != "eof":
            if self._accept(";"):
                continue
            self._accept("my") or self._accept("our")
            self._statement()
            if self.tok.kind != "eof":
                self._expect(";", "after a statement")
        if self.profiles is None:
            raise S3CredentialsError("no %awsSecretAccessKeys assignment found")
        return S3curlFile(profiles=self.profiles, endpoints=tuple(self.endpoints))

    def _statement(self):
        if self._accept("%awsSecretAccessKeys"):
            if self.profiles is not None:
                self._fail("%awsSecretAccessKeys assigned twice")
            self._expect("=", "after %awsSecretAccessKeys")
            self.profiles = self._profiles()
        elif self._accept("push"):
            parens = self._accept("(")
            self._expect("@endpoints", "after 'push'")
            self._expect(",", "after 'push @endpoints'")
            self.endpoints += self._string_list(")" if parens else ";")
            if parens:
                self._expect(")", "closing 'push('")
        elif self._accept("@endpoints"):
            self._expect("=", "after @endpoints")
            self._expect("(", "after '@endpoints ='")
            self.endpoints = self._string_list(")")
            self._expect(")", "closing the @endpoints list")
        else:
            self._fail("expected %awsSecretAccessKeys, 'push @endpoints' or '@endpoints ='")

    def _string_list(self, closer):
        values = []
        while self.tok.kind != "eof" and not (self.tok.kind == "punct" and self.tok.text == closer):
            values.append(self._string_value("in the endpoint list"))
            if not self._accept(","):
                break
        return values

    def _profiles(self):
        self._expect("(", "after '%awsSecretAccessKeys ='")
        profiles = {}
        while not self._accept(")"):
            line = self.tok.line
            if self.tok.kind not in ("word", "string"):
                self._fail("expected a profile name")
            name = self._next().text
            if not _BAREWORD.fullmatch(name):
                raise S3CredentialsError(f"invalid profile name at line {line} (letters, digits, _ . - only)")
            if name in profiles:
                raise S3CredentialsError(f"profile {name!r} defined twice (second at line {line})")
            self._expect("=>", f"after profile name {name!r}")
            profiles[name] = self._profile(name, line)
            if not self._accept(","):
                self._expect(")", f"after profile {name!r}")
                break
        return profiles

    def _profile(self, name, line):
        self._expect("{", f"to open profile {name!r}")
        fields = {}
        while not self._accept("}"):
            field_line = self.tok.line
            if self.tok.kind not in ("word", "string"):
                self._fail(f"expected 'id' or 'key' in profile {name!r}")
            field_name = self._next().text
            if field_name not in ("id", "key"):
                raise S3CredentialsError(
                    f"unknown field in profile {name!r} at line {field_line} (only 'id' and 'key' are allowed)")
            if field_name in fields:
                raise S3CredentialsError(f"'{field_name}' given twice in profile {name!r} at line {field_line}")
            self._expect("=>", f"after '{field_name}' in profile {name!r}")
            fields[field_name] = self._string_value(f"for '{field_name}' in profile {name!r}")
            if not self._accept(","):
                self._expect("}", f"after '{field_name}' in profile {name!r}")
                break
        missing = [f for f in ("id", "key") if not fields.get(f)]
        if missing:
            raise S3CredentialsError(f"profile {name!r} (line {line}) lacks a non-empty {' and '.join(missing)}")
        return Credentials(id=fields["id"], key=fields["key"])


def parse(text):
    """Parse .s3curl text into an S3curlFile; S3CredentialsError names what and which line."""
    return _Parser(text).file()


def read(path):
    """Read and parse a .s3curl file, refusing one that others could read."""
    raw = files.read_private(path, S3CredentialsError, ": create it (s3curl format) with mode 600")
    path = os.path.expanduser(path)
    try:
        return parse(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise S3CredentialsError(f"{path} is not UTF-8 text") from None
    except S3CredentialsError as exc:
        raise S3CredentialsError(f"{path}: {exc}") from None


def load(path, profile):
    """The Credentials of `profile` in the .s3curl file at `path`."""
    parsed = read(path)
    try:
        return parsed.profiles[profile]
    except KeyError:
        names = ", ".join(sorted(parsed.profiles)) or "none"
        raise S3CredentialsError(
            f"profile {profile!r} not found in {os.path.expanduser(path)}; available profiles: {names}") from None
