package qubesdb

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestCheckPath(t *testing.T) {
	good := []string{
		"", "/", "/qubes-ip", "/qubes-firewall/10.137.0.3/0000", "/qubes-firewall/",
		"/qubes-firewall/fd09:24ef:4179::a89:3", "/dns/10.137.0.3/a_b.c@d", "a-b",
		"/" + strings.Repeat("x", MaxPathLen-1),
	}
	for _, p := range good {
		assert.NoError(t, CheckPath(p), p)
	}
	bad := []string{
		"-leading-dash", "/a b", "/a\x00", "/a\n", "/a*", "/é", "/a\\b",
		"/" + strings.Repeat("x", MaxPathLen),
	}
	for _, p := range bad {
		assert.ErrorIs(t, CheckPath(p), ErrInvalid, "%q", p)
	}
}

func TestCheckKeyAndRmPath(t *testing.T) {
	assert.NoError(t, CheckKey("/qubes-ip"))
	assert.NoError(t, CheckKey("/a/b"))
	for _, p := range []string{"", "/", "qubes-ip", "/a/", "/a b"} {
		assert.ErrorIs(t, CheckKey(p), ErrInvalid, "%q", p)
	}
	for _, p := range []string{"/", "/a", "/a/"} {
		assert.NoError(t, CheckRmPath(p), "%q", p)
	}
	for _, p := range []string{"", "a/", "/a*"} {
		assert.ErrorIs(t, CheckRmPath(p), ErrInvalid, "%q", p)
	}
}

func TestCheckValue(t *testing.T) {
	assert.NoError(t, CheckValue(""))
	assert.NoError(t, CheckValue(strings.Repeat("v", MaxValueLen)))
	assert.NoError(t, CheckValue([]byte("action=accept\xff\n")))
	assert.ErrorIs(t, CheckValue(strings.Repeat("v", MaxValueLen+1)), ErrInvalid)
	assert.ErrorIs(t, CheckValue([]byte("a\x00b")), ErrInvalid)
}

func TestCheckVchan(t *testing.T) {
	ok := []Message{
		{Type: CmdMultiread},
		{Type: CmdWrite, Path: "/qubes-firewall/10.137.0.3", Data: nil},
		{Type: CmdWrite, Path: "/a", Data: []byte("v")},
		{Type: CmdRm, Path: "/qubes-firewall/10.137.0.3/"},
		{Type: CmdRm, Path: "/a"},
		{Type: RespOK, Path: "/a"},
		{Type: RespError, Path: "/a"},
		{Type: RespMultiread, Path: "/a", Data: []byte("v")},
		{Type: RespMultiread},
	}
	for _, m := range ok {
		assert.NoError(t, CheckVchan(m), m.String())
	}
	bad := []Message{
		{Type: CmdRead, Path: "/a"},
		{Type: CmdList, Path: "/a"},
		{Type: CmdWatch, Path: "/a"},
		{Type: CmdUnwatch, Path: "/a"},
		{Type: RespErrorNoent, Path: "/a"},
		{Type: RespRead, Path: "/a"},
		{Type: RespList, Path: "/a"},
		{Type: RespWatch, Path: "/a"},
		{Type: MsgType(0xff)},
		{Type: CmdWrite, Path: "/a/"},
		{Type: CmdWrite, Path: "a"},
		{Type: CmdWrite, Path: "/a", Data: []byte("x\x00")},
		{Type: CmdWrite, Path: "/a?"},
		{Type: CmdRm, Path: ""},
		{Type: CmdRm, Path: "/a", Data: []byte("x")},
		{Type: CmdMultiread, Data: []byte("x")},
		{Type: RespOK, Path: "/a", Data: []byte("x")},
		{Type: RespError, Path: "/a", Data: []byte("x")},
		{Type: RespMultiread, Data: []byte("x")},
		{Type: RespMultiread, Path: "/a/", Data: []byte("x")},
		{Type: RespMultiread, Path: "/a", Data: []byte("\x00")},
		{Type: RespOK, Path: "-a"},
	}
	for _, m := range bad {
		assert.ErrorIs(t, CheckVchan(m), ErrInvalid, m.String())
	}
}
