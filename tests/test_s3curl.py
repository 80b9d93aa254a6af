"""The .s3curl parser and loader: pure, no servers."""
import os

import pytest

from ganymede import s3curl
from ganymede.errors import S3CredentialsError
from ganymede.s3curl import Credentials

SECRET = "zyMrlZUKeG9UcYpwzlPko/+Ciu0K2co0duRM3fhi"
SECRET2 = "Q2hlY2tZb3VyS2V5QW5kU2lnbmluZ01ldGhvZA+/x"

TYPICAL = f"""\
# s3curl credentials for the backup host
%awsSecretAccessKeys = (
    # the pipeline's own account
    ganymede => {{
        id => 'GANYMEDEID0000000001',
        key => '{SECRET}',
    }},

    "ops" => {{ key => "{SECRET2}", id => "OPSID" }},   # trailing comment, key first
);
push @endpoints , 'cloudfiles.example.com', 'cf2.example.com';
"""


def test_typical_file_has_every_profile_and_endpoint():
    parsed = s3curl.parse(TYPICAL)
    assert parsed.profiles == {
        "ganymede": Credentials("GANYMEDEID0000000001", SECRET),
        "ops": Credentials("OPSID", SECRET2),
    }
    assert parsed.endpoints == ("cloudfiles.example.com", "cf2.example.com")


@pytest.mark.parametrize("text, profiles, endpoints", [
    pytest.param("%awsSecretAccessKeys = ( a => { id => 'I', key => 'K' } );",
                 {"a": ("I", "K")}, (), id="minimal, no trailing commas"),
    pytest.param('%awsSecretAccessKeys = ( a => { id => "I", key => "K", }, );',
                 {"a": ("I", "K")}, (), id="double quotes, trailing commas"),
    pytest.param("%awsSecretAccessKeys=(a=>{key=>'K',id=>'I'});",
                 {"a": ("I", "K")}, (), id="no whitespace, key before id"),
    pytest.param("%awsSecretAccessKeys\n=\n(\n'a-b'\n=>\n{\nid\n=>\n'I'\n,\nkey\n=>\n'K'\n}\n)\n;\n",
                 {"a-b": ("I", "K")}, (), id="newlines everywhere, quoted name"),
    pytest.param("%awsSecretAccessKeys = ( a => { 'id' => 'I', 'key' => 'K' } )",
                 {"a": ("I", "K")}, (), id="quoted field names, no final semicolon"),
    pytest.param("%awsSecretAccessKeys = ( a => { id => 'I#1', key => 'K # not a comment' } ); # real one",
                 {"a": ("I#1", "K # not a comment")}, (), id="hash inside quotes is not a comment"),
    pytest.param("%awsSecretAccessKeys = ( a => { id => 'I', key => 'it\\'s\\\\' } );",
                 {"a": ("I", "it's\\")}, (), id="single-quote escapes"),
    pytest.param("%awsSecretAccessKeys = ( a => { id => 'I', key => 'K' } );\n@endpoints = ('h1', \"h2\",);",
                 {"a": ("I", "K")}, ("h1", "h2"), id="@endpoints assignment"),
    pytest.param("%awsSecretAccessKeys = ( a => { id => 'I', key => 'K' } );\npush(@endpoints, 'h1');",
                 {"a": ("I", "K")}, ("h1",), id="push with parentheses"),
    pytest.param("my %awsSecretAccessKeys = (\n  # none yet\n);", {}, (), id="'my' and an empty table"),
])
def test_parse_variants(text, profiles, endpoints):
    parsed = s3curl.parse(text)
    assert {name: (c.id, c.key) for name, c in parsed.profiles.items()} == profiles
    assert parsed.endpoints == endpoints


@pytest.mark.parametrize("text, message", [
    ("", "no %awsSecretAccessKeys"),
    ("# only a comment\n", "no %awsSecretAccessKeys"),
    (f"%awsSecretAccessKeys = (\n  a => {{ id => 'I', key => '{SECRET}' \n", "line 3"),
    (f"%awsSecretAccessKeys = (\n  a => {{ id => 'I', key => '{SECRET}\n", "unterminated quoted string starting at line 2"),
    (f"%awsSecretAccessKeys = (\n a => {{ id => 'I', key => {SECRET} }} );", "line 2"),
    (f"%awsSecretAccessKeys = (\n a => {{ id => 'I', secret => '{SECRET}' }} );", "unknown field"),
    ("%awsSecretAccessKeys = (\n a => { id => 'I' } );", "lacks a non-empty key"),
    (f"%awsSecretAccessKeys = (\n a => {{ key => '{SECRET}' }} );", "lacks a non-empty id"),
    (f"%awsSecretAccessKeys = (\n a => {{ id => 'I', key => '{SECRET}', key => 'x' }} );", "'key' given twice"),
    (f"%awsSecretAccessKeys = (\n a => {{ id => 'I', key => '{SECRET}' }},\n a => {{ id => 'J', key => 'K' }} );",
     "profile 'a' defined twice (second at line 3)"),
    (f"%awsSecretAccessKeys = ( a => {{ id => 'I', key => \"{SECRET}$x\" }} );", "use single quotes"),
    (f"%awsSecretAccessKeys = ( a => {{ id => 'I', key => '{SECRET}' }} );\nsystem('rm -rf /');", "line 2"),
    (f"%awsSecretAccessKeys = ( a => {{ id => 'I', key => '{SECRET}' }} )\n$x = 1;", "line 2"),
    (f"%awsSecretAccessKeys = ( a => {{ id => 'I', key => '{SECRET}' }} ) ~", "unexpected character at line 1"),
])
def test_malformed_text_says_what_and_where_but_not_the_secret(text, message):
    with pytest.raises(S3CredentialsError) as caught:
        s3curl.parse(text)
    assert message in str(caught.value)
    assert SECRET not in str(caught.value) and SECRET not in repr(caught.value)


def test_credentials_repr_hides_the_key():
    creds = Credentials("AKID", SECRET)
    assert SECRET not in repr(creds) and SECRET not in str(creds)
    assert SECRET not in repr(s3curl.parse(TYPICAL))
    assert "AKID" in repr(creds)


@pytest.fixture
def s3curl_file(tmp_path):
    path = tmp_path / ".s3curl"
    path.write_text(TYPICAL)
    os.chmod(path, 0o600)
    return path


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_load_accepts_private_file(s3curl_file, mode):
    os.chmod(s3curl_file, mode)
    assert s3curl.load(str(s3curl_file), "ops") == Credentials("OPSID", SECRET2)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o620, 0o602])
def test_load_refuses_file_others_can_access(s3curl_file, mode):
    os.chmod(s3curl_file, mode)
    with pytest.raises(S3CredentialsError) as caught:
        s3curl.load(str(s3curl_file), "ganymede")
    assert f"chmod 600 {s3curl_file}" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_load_expands_home(s3curl_file, monkeypatch):
    monkeypatch.setenv("HOME", str(s3curl_file.parent))
    assert s3curl.load("~/.s3curl", "ganymede").id == "GANYMEDEID0000000001"


def test_missing_profile_lists_names_not_keys(s3curl_file):
    with pytest.raises(S3CredentialsError) as caught:
        s3curl.load(str(s3curl_file), "backup")
    message = str(caught.value)
    assert "'backup'" in message and "available profiles: ganymede, ops" in message
    assert SECRET not in message and SECRET2 not in message


def test_missing_file(tmp_path):
    with pytest.raises(S3CredentialsError, match="does not exist"):
        s3curl.load(str(tmp_path / "nope"), "ganymede")


def test_directory_is_not_a_regular_file(tmp_path):
    os.chmod(tmp_path, 0o700)
    with pytest.raises(S3CredentialsError, match="not a regular file"):
        s3curl.load(str(tmp_path), "ganymede")


def test_fifo_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(S3CredentialsError, match="not a regular file"):
        s3curl.load(str(fifo), "ganymede")


def test_malformed_file_names_the_path_and_line(tmp_path):
    path = tmp_path / ".s3curl"
    path.write_text(f"%awsSecretAccessKeys = (\n a => {{ id => 'I' key => '{SECRET}' }} );\n")
    os.chmod(path, 0o600)
    with pytest.raises(S3CredentialsError) as caught:
        s3curl.load(str(path), "a")
    assert str(path) in str(caught.value) and "line 2" in str(caught.value)
    assert SECRET not in str(caught.value)
