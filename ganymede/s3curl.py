"""The .s3curl credentials file (docs/operations-s3.md): the subset of s3curl's Perl it needs, without Perl.

Error messages name tokens by kind and never quote a string literal: a secret key cannot leak through them.
"""
import os
import re
from collections import namedtuple
from dataclasses import dataclass, field

from . import files
from .errors import S3CredentialsError


@dataclass(frozen=True)
class Credentials:
    """One profile's access key id and secret key; the repr (and str) leaves the secret out."""

    id: str
    key: str = field(repr=False)


S3curlFile = namedtuple("S3curlFile", "profiles endpoints")

_WORD = r"[A-Za-z_][A-Za-z0-9_.\-]*"
_TOKEN = re.compile(rf"""(?P<space>\s+|\#[^\n]*)
    | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
    | (?P<punct>=>|[(){{}},;=])
    | (?P<var>[%@$][A-Za-z_][A-Za-z0-9_]*)
    | (?P<word>{_WORD})
    | (?P<bad>.)""", re.VERBOSE | re.DOTALL)
_DOUBLE_ESCAPES = {"\\": "\\", '"': '"', "$": "$", "@": "@", "n": "\n", "t": "\t"}
_FOUND = {"string": "a quoted string", "word": "a bare word", "eof": "the end of the file"}  # never the value
_Token = namedtuple("_Token", "kind text line")


def _tokens(text):
    line = 1
    for match in _TOKEN.finditer(text):  # contiguous: <bad> matches any character the others do not
        if match.lastgroup == "bad" and match[0] in "'\"":
            raise S3CredentialsError(f"unterminated quoted string starting at line {line}")
        if match.lastgroup == "bad":
            column = match.start() - text.rfind("\n", 0, match.start())
            raise S3CredentialsError(f"unexpected character at line {line}, column {column}")
        if match.lastgroup != "space":
            value = _unquote(match[0], line) if match.lastgroup == "string" else match[0]
            yield _Token(match.lastgroup, value, line)
        line += match[0].count("\n")
    yield _Token("eof", "", line)


def _unquote(literal, line):
    """The value of a quoted literal: Perl's escapes, and no interpolation in double quotes."""
    if literal[0] == "'":
        return re.sub(r"\\([\\'])", r"\1", literal[1:-1])

    def unescape(match):
        if match[0] in "$@":
            raise S3CredentialsError(f"double-quoted string at line {line} contains '{match[0]}', which Perl "
                                     "would interpolate: use single quotes")
        if match[1] not in _DOUBLE_ESCAPES:
            raise S3CredentialsError(f"unsupported escape in a double-quoted string at line {line}")
        return _DOUBLE_ESCAPES[match[1]]

    return re.sub(r"\\(.)|[$@]", unescape, literal[1:-1], flags=re.DOTALL)


class _Reader:
    """Recursive descent over the tokens, one method per construct."""

    def __init__(self, text):
        self.tokens, self.pos = list(_tokens(text)), 0

    @property
    def tok(self):
        return self.tokens[self.pos]

    def fail(self, what):
        found = _FOUND.get(self.tok.kind, repr(self.tok.text))
        raise S3CredentialsError(f"{what} at line {self.tok.line}, found {found}")

    def at(self, text):
        return self.tok.kind not in ("string", "eof") and self.tok.text == text

    def accept(self, text):
        found = self.at(text)
        self.pos += found
        return found

    def expect(self, text, context):
        if not self.accept(text):
            self.fail(f"expected '{text}' {context}")

    def take(self, kinds, what):
        if self.tok.kind not in kinds:
            self.fail(f"expected {what}")
        self.pos += 1
        return self.tokens[self.pos - 1]

    def file(self):
        profiles, endpoints = None, []
        while self.tok.kind != "eof":
            if self.accept(";"):
                continue
            self.accept("my") or self.accept("our")
            if self.accept("%awsSecretAccessKeys"):
                if profiles is not None:
                    self.fail("%awsSecretAccessKeys assigned twice")
                self.expect("=", "after %awsSecretAccessKeys")
                profiles = self.profiles()
            elif self.accept("push"):
                parens = self.accept("(")
                self.expect("@endpoints", "after 'push'")
                self.expect(",", "after 'push @endpoints'")
                endpoints += self.strings(")" if parens else ";")
                if parens:
                    self.expect(")", "closing 'push('")
            elif self.accept("@endpoints"):
                self.expect("=", "after @endpoints")
                self.expect("(", "after '@endpoints ='")
                endpoints = self.strings(")")
                self.expect(")", "closing the @endpoints list")
            else:
                self.fail("expected %awsSecretAccessKeys, 'push @endpoints' or '@endpoints ='")
            if self.tok.kind != "eof":
                self.expect(";", "after a statement")
        if profiles is None:
            raise S3CredentialsError("no %awsSecretAccessKeys assignment found")
        return S3curlFile(profiles, tuple(endpoints))

    def strings(self, closer):
        """Comma-separated quoted strings up to `closer` (not taken), a trailing comma allowed."""
        values = []
        while self.tok.kind != "eof" and not self.at(closer):
            values.append(self.take(("string",), "a quoted string in the endpoint list").text)
            if not self.accept(","):
                break
        return values

    def pairs(self, closer, what, context):
        """Yield the name token of each `name => value` up to `closer`; the caller checks the name (before
        any message quotes it) and reads `=> value`."""
        while not self.accept(closer):
            token = self.take(("word", "string"), what)
            yield token
            if not self.accept(","):
                self.expect(closer, f"after {token.text!r} in {context}")
                return

    def profiles(self):
        self.expect("(", "after '%awsSecretAccessKeys ='")
        profiles = {}
        for token in self.pairs(")", "a profile name", "%awsSecretAccessKeys"):
            name = token.text
            if not re.fullmatch(_WORD, name):
                raise S3CredentialsError(f"invalid profile name at line {token.line} "
                                         "(letters, digits, _ . - only)")
            if name in profiles:
                raise S3CredentialsError(f"profile {name!r} defined twice (second at line {token.line})")
            self.expect("=>", f"after profile name {name!r}")
            profiles[name] = self.profile(name, token.line)
        return profiles

    def profile(self, name, line):
        self.expect("{", f"to open profile {name!r}")
        fields = {}
        for token in self.pairs("}", f"'id' or 'key' in profile {name!r}", f"profile {name!r}"):
            key = token.text
            if key not in ("id", "key"):
                raise S3CredentialsError(f"unknown field in profile {name!r} at line {token.line} "
                                         "(only 'id' and 'key' are allowed)")
            if key in fields:
                raise S3CredentialsError(f"'{key}' given twice in profile {name!r} at line {token.line}")
            self.expect("=>", f"after '{key}' in profile {name!r}")
            fields[key] = self.take(("string",), f"a quoted string for '{key}' in profile {name!r}").text
        if missing := [f for f in ("id", "key") if not fields.get(f)]:
            raise S3CredentialsError(f"profile {name!r} (line {line}) lacks a non-empty "
                                     f"{' and '.join(missing)}")
        return Credentials(fields["id"], fields["key"])


def parse(text):
    """Parse .s3curl text into an S3curlFile; S3CredentialsError names what and which line."""
    return _Reader(text).file()


def load(path, profile):
    """The Credentials of `profile` in the .s3curl file at `path`, refused if others could read the file."""
    raw = files.read_private(path, S3CredentialsError, ": create it (s3curl format) with mode 600")
    path = os.path.expanduser(path)
    try:
        profiles = parse(raw.decode("utf-8")).profiles
    except UnicodeDecodeError:
        raise S3CredentialsError(f"{path} is not UTF-8 text") from None
    except S3CredentialsError as exc:
        raise S3CredentialsError(f"{path}: {exc}") from None
    if profile not in profiles:
        names = ", ".join(sorted(profiles)) or "none"
        raise S3CredentialsError(f"profile {profile!r} not found in {path}; available profiles: {names}")
    return profiles[profile]
