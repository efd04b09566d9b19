package xenstore

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestMsgRoundTrip(t *testing.T) {
	m := Msg{Op: OpWrite, ReqID: 0x01020304, TxID: 7, Payload: []byte("a/b\x00value")}
	b, err := AppendMsg(nil, m)
	require.NoError(t, err)
	require.Len(t, b, HeaderLen+len(m.Payload))
	h := Header(b)
	assert.Equal(t, OpWrite, h.Op())
	assert.Equal(t, []byte{4, 3, 2, 1}, b[4:8], "little-endian req_id")
	assert.Equal(t, uint32(len(m.Payload)), h.Len())

	got, err := ReadMsg(bytes.NewReader(b), make([]byte, HeaderLen+MaxPayload))
	require.NoError(t, err)
	assert.Equal(t, m, got)
}

func TestReadMsgRejects(t *testing.T) {
	buf := make([]byte, HeaderLen+MaxPayload)
	long := make([]byte, HeaderLen)
	Header(long).SetLen(MaxPayload + 1)
	_, err := ReadMsg(bytes.NewReader(long), buf)
	require.ErrorIs(t, err, ErrTooLong)

	short := make([]byte, HeaderLen+2)
	Header(short).SetLen(3)
	_, err = ReadMsg(bytes.NewReader(short), buf)
	require.ErrorIs(t, err, io.ErrUnexpectedEOF)

	_, err = ReadMsg(bytes.NewReader(nil), buf)
	require.ErrorIs(t, err, io.EOF)
	_, err = ReadMsg(bytes.NewReader(short), buf[:10])
	require.Error(t, err)

	_, err = AppendMsg(nil, Msg{Op: OpWrite, Payload: make([]byte, MaxPayload+1)})
	require.ErrorIs(t, err, ErrTooLong)
}

func TestOpString(t *testing.T) {
	assert.Equal(t, "WATCH_EVENT", OpWatchEvent.String())
	assert.Equal(t, "Op(20)", Op(20).String())
	assert.Equal(t, "Op(99)", Op(99).String())
}

func TestStrings(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string
		ok   bool
	}{
		{"", nil, true},
		{"\x00", []string{""}, true},
		{"a\x00bc\x00", []string{"a", "bc"}, true},
		{"a\x00\x00", []string{"a", ""}, true},
		{"abc", nil, false},
		{"a\x00b", nil, false},
	} {
		got, err := Strings([]byte(tc.in))
		if !tc.ok {
			assert.ErrorIs(t, err, ErrMalformed, "%q", tc.in)
			continue
		}
		require.NoError(t, err, "%q", tc.in)
		assert.Equal(t, tc.want, got, "%q", tc.in)
	}
	assert.Equal(t, []byte("a\x00\x00b\x00"), AppendStrings(nil, "a", "", "b"))
}

func TestParsePerm(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Perm
		ok   bool
	}{
		{"n0", Perm{0, AccessNone}, true},
		{"r5", Perm{5, AccessRead}, true},
		{"w65535", Perm{65535, AccessWrite}, true},
		{"b12", Perm{12, AccessBoth}, true},
		{"r65536", Perm{}, false},
		{"x1", Perm{}, false},
		{"r", Perm{}, false},
		{"r+1", Perm{}, false},
		{"r-1", Perm{}, false},
		{"r1a", Perm{}, false},
		{"", Perm{}, false},
	} {
		got, err := ParsePerm(tc.in)
		if !tc.ok {
			assert.ErrorIs(t, err, ErrMalformed, "%q", tc.in)
			continue
		}
		require.NoError(t, err, "%q", tc.in)
		assert.Equal(t, tc.want, got)
		assert.Equal(t, tc.in, got.String())
	}
	_, err := ParsePerms(nil)
	assert.ErrorIs(t, err, ErrMalformed)
	_, err = ParsePerms(make([]string, MaxPerms+1))
	assert.ErrorIs(t, err, ErrMalformed)
	_, err = ParsePerms([]string{"n0", "q1"})
	assert.ErrorIs(t, err, ErrMalformed)
}

func TestAccessFor(t *testing.T) {
	ps := []Perm{{3, AccessRead}, {5, AccessNone}, {7, AccessBoth}}
	assert.Equal(t, AccessNone, AccessFor(ps, 5))
	assert.Equal(t, AccessBoth, AccessFor(ps, 7))
	assert.Equal(t, AccessRead, AccessFor(ps, 9), "default")
	assert.Equal(t, AccessNone, AccessFor(nil, 9))
	assert.True(t, AccessBoth.CanRead() && AccessBoth.CanWrite())
	assert.False(t, AccessRead.CanWrite() || AccessWrite.CanRead() || AccessNone.CanRead())
}

func TestParseErrorAndWatchEvent(t *testing.T) {
	e, err := ParseError([]byte("ENOENT\x00"))
	require.NoError(t, err)
	assert.Equal(t, ENOENT, e)
	for _, bad := range []string{"ENOENT", "\x00", string(make([]byte, 40)) + "X\x00"} {
		_, err = ParseError([]byte(bad))
		assert.ErrorIs(t, err, ErrMalformed, "%q", bad)
	}

	p, tok, err := ParseWatchEvent([]byte("a/b\x00tok\x00extra\x00"))
	require.NoError(t, err)
	assert.Equal(t, "a/b", p)
	assert.Equal(t, "tok", tok)
	_, _, err = ParseWatchEvent([]byte("a/b\x00"))
	assert.ErrorIs(t, err, ErrMalformed)
}

// fakeServer answers each request of a client with the reply chosen by answer.
func fakeServer(t *testing.T, answer func(Msg) []Msg) *Client {
	t.Helper()
	cli, srv := net.Pipe()
	go func() {
		buf := make([]byte, HeaderLen+MaxPayload)
		for {
			m, err := ReadMsg(srv, buf)
			if err != nil {
				srv.Close()
				return
			}
			for _, r := range answer(m) {
				b, _ := AppendMsg(nil, r)
				if _, err := srv.Write(b); err != nil {
					return
				}
			}
		}
	}()
	c := NewClient(cli)
	t.Cleanup(func() { c.Close() })
	return c
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestClientProtocolViolations(t *testing.T) {
	c := fakeServer(t, func(m Msg) []Msg {
		r := Msg{Op: m.Op, ReqID: m.ReqID}
		path, _ := FirstString(m.Payload)
		switch path {
		case "wrongtype":
			r.Op = OpDirectory
		case "badERROR":
			r.Op, r.Payload = OpError, []byte("EIO")
		case "badlist":
			r.Payload = []byte("a\x00b")
		case "badperms":
			r.Payload = []byte("z1\x00")
		case "strayreply": // a reply nobody waits for, then the real one
			return []Msg{{Op: OpRead, ReqID: 999}, r}
		}
		if m.Op == OpTransactionStart {
			r.Payload = []byte("zero\x00")
		}
		return []Msg{r}
	})
	ctx := ctxT(t)
	_, err := c.Read(ctx, "wrongtype")
	assert.ErrorIs(t, err, ErrMalformed)
	_, err = c.Read(ctx, "badERROR")
	assert.ErrorIs(t, err, ErrMalformed)
	_, err = c.Directory(ctx, "badlist")
	assert.ErrorIs(t, err, ErrMalformed)
	_, err = c.GetPerms(ctx, "badperms")
	assert.ErrorIs(t, err, ErrMalformed)
	_, err = c.Read(ctx, "strayreply")
	assert.NoError(t, err)
	err = c.Transaction(ctx, func(*Tx) error { return nil })
	assert.ErrorIs(t, err, ErrMalformed)
	_, err = c.IsDomainIntroduced(ctx, 1)
	assert.ErrorIs(t, err, ErrMalformed)
	_, err = c.GetDomainPath(ctx, 1)
	assert.ErrorIs(t, err, ErrMalformed)
	assert.NoError(t, c.Err(), "violations fail the request, not the connection")
}

func TestClientTransactionGivesUp(t *testing.T) {
	c := fakeServer(t, func(m Msg) []Msg {
		switch m.Op {
		case OpTransactionStart:
			return []Msg{{Op: m.Op, ReqID: m.ReqID, Payload: []byte("5\x00")}}
		case OpTransactionEnd:
			return []Msg{{Op: OpError, ReqID: m.ReqID, Payload: []byte("EAGAIN\x00")}}
		}
		return []Msg{{Op: m.Op, ReqID: m.ReqID, Payload: []byte("OK\x00")}}
	})
	runs := 0
	err := c.Transaction(ctxT(t), func(tx *Tx) error {
		runs++
		return tx.Write(context.Background(), "x", nil)
	})
	assert.ErrorIs(t, err, EAGAIN)
	assert.Equal(t, maxTxAttempts, runs)
}

func TestClientServerGone(t *testing.T) {
	c := fakeServer(t, func(m Msg) []Msg { return nil }) // never answers
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := c.Read(ctx, "x")
	assert.ErrorIs(t, err, context.Canceled)

	w, err := func() (*Watch, error) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Millisecond)
		defer cancel()
		return c.Watch(ctx, "x")
	}()
	assert.Nil(t, w)
	assert.ErrorIs(t, err, context.DeadlineExceeded)

	require.NoError(t, c.Close())
	<-c.Done()
	assert.ErrorIs(t, c.Err(), ErrClosed)
	_, err = c.Read(ctxT(t), "x")
	assert.ErrorIs(t, err, ErrClosed)
	_, err = c.Watch(ctxT(t), "x")
	assert.ErrorIs(t, err, ErrClosed)
	var xe *Error
	require.True(t, errors.As(err, &xe))
	assert.Equal(t, OpWatch, xe.Op)
	assert.Contains(t, err.Error(), "xenstore WATCH x")
}
