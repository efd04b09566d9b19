package xenstore

import (
	"bytes"
	"context"
	"net"
	"testing"
	"time"
)

func seedMsgs(f *testing.F) {
	for _, m := range []Msg{
		{Op: OpRead, ReqID: 1, Payload: []byte("domid\x00")},
		{Op: OpWatchEvent, Payload: []byte("backend/vif\x00qfw1\x00")},
		{Op: OpError, ReqID: 2, Payload: []byte("ENOENT\x00")},
		{Op: OpGetPerms, ReqID: 3, Payload: []byte("n0\x00r5\x00")},
		{Op: OpTransactionStart, ReqID: 4, Payload: []byte("17\x00")},
	} {
		b, _ := AppendMsg(nil, m)
		f.Add(b)
	}
	f.Add([]byte{})
	f.Add(bytes.Repeat([]byte{0xff}, 20))
}

// FuzzReadMsg: any byte stream decodes into messages that re-encode to the
// same bytes, or fails cleanly.
func FuzzReadMsg(f *testing.F) {
	seedMsgs(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		buf := make([]byte, HeaderLen+MaxPayload)
		consumed := 0
		for range 64 {
			m, err := ReadMsg(r, buf)
			if err != nil {
				return
			}
			b, err := AppendMsg(nil, m)
			if err != nil {
				t.Fatalf("decoded message does not re-encode: %v", err)
			}
			if !bytes.Equal(b, data[consumed:consumed+len(b)]) {
				t.Fatalf("re-encoding differs")
			}
			consumed += len(b)
		}
	})
}

// FuzzPayloads runs every payload decoder on arbitrary bytes.
func FuzzPayloads(f *testing.F) {
	for _, s := range []string{"", "\x00", "a\x00b\x00", "n0\x00r5\x00", "ENOENT\x00", "p\x00t\x00", "r99999\x00"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, p []byte) {
		ss, err := Strings(p)
		if err == nil {
			if !bytes.Equal(AppendStrings(nil, ss...), p) {
				t.Fatalf("Strings does not round-trip %q", p)
			}
			if ps, err := ParsePerms(ss); err == nil {
				for i, pm := range ps {
					if back, err := ParsePerm(pm.String()); err != nil || back != pm {
						t.Fatalf("perm %q does not round-trip: %v", ss[i], err)
					}
				}
				_ = AccessFor(ps, 1)
			}
		}
		_, _ = FirstString(p)
		_, _, _ = ParseWatchEvent(p)
		_, _ = ParseError(p)
	})
}

// FuzzClient feeds a client arbitrary server output while requests and a
// watch are outstanding; the client must fail requests, never panic or hang.
func FuzzClient(f *testing.F) {
	seedMsgs(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		cli, srv := net.Pipe()
		c := NewClient(cli)
		go func() {
			buf := make([]byte, HeaderLen+MaxPayload)
			// Answer the first two requests with the fuzz bytes, then hang up.
			for range 2 {
				if _, err := ReadMsg(srv, buf); err != nil {
					break
				}
			}
			srv.Write(data)
			srv.Close()
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done := make(chan struct{})
		go func() {
			defer close(done)
			if w, err := c.Watch(ctx, "w"); err == nil {
				for range w.C() {
				}
			}
		}()
		_, _ = c.Read(ctx, "x")
		<-done
		c.Close()
		if ctx.Err() != nil {
			t.Fatal("client hung on hostile input")
		}
	})
}
