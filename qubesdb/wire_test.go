package qubesdb

import (
	"bytes"
	"encoding/binary"
	"io"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// rawHeader builds a header byte by byte, independently of Header's setters.
func rawHeader(t MsgType, path string, dataLen uint32) []byte {
	b := make([]byte, 72)
	b[0] = byte(t)
	copy(b[1:65], path)
	binary.LittleEndian.PutUint32(b[68:], dataLen)
	return b
}

func TestMessageLayout(t *testing.T) {
	b, err := AppendMessage(nil, CmdWrite, "/qubes-ip", []byte("10.137.0.6"))
	require.NoError(t, err)
	want := append(rawHeader(CmdWrite, "/qubes-ip", 10), "10.137.0.6"...)
	assert.Equal(t, want, b)
	assert.Equal(t, []byte{0, 0, 0}, b[65:68], "padding must be zero")

	h := Header(b[:HeaderLen])
	assert.Equal(t, CmdWrite, h.Type())
	p, ok := h.Path()
	assert.True(t, ok)
	assert.Equal(t, "/qubes-ip", string(p))
	assert.Equal(t, uint32(10), h.DataLen())
}

func TestHeaderSetPathClearsOldBytes(t *testing.T) {
	h := Header(rawHeader(RespOK, "/a/very/long/path/that/was/there/before", 0))
	h.SetPath("/x")
	p, ok := h.Path()
	require.True(t, ok)
	assert.Equal(t, "/x", string(p))
	assert.Equal(t, make([]byte, 62), []byte(h[3:65]))
}

func TestHeaderPathUnterminated(t *testing.T) {
	h := Header(rawHeader(CmdWrite, strings.Repeat("a", 64), 0))
	p, ok := h.Path()
	assert.False(t, ok)
	assert.Len(t, p, 64)
}

func TestRoundTrip(t *testing.T) {
	msgs := []Message{
		{Type: CmdMultiread},
		{Type: RespMultiread, Path: "/qubes-firewall/10.137.0.3/0000", Data: []byte("action=accept")},
		{Type: RespMultiread},
		{Type: CmdWrite, Path: "/" + strings.Repeat("p", MaxPathLen-1), Data: bytes.Repeat([]byte{'v'}, MaxValueLen)},
		{Type: CmdRm, Path: "/qubes-firewall/10.137.0.3/"},
		{Type: MsgType(0xfe), Path: "/odd"},
	}
	var buf bytes.Buffer
	for _, m := range msgs {
		require.NoError(t, WriteMessage(&buf, m))
	}
	for _, want := range msgs {
		got, err := ReadMessage(&buf)
		require.NoError(t, err)
		assert.Equal(t, want, got)
	}
	_, err := ReadMessage(&buf)
	assert.Equal(t, io.EOF, err)
}

func TestReadMessageErrors(t *testing.T) {
	tests := []struct {
		name  string
		input []byte
		isErr error
	}{
		{"empty stream", nil, io.EOF},
		{"short header", rawHeader(CmdWrite, "/a", 0)[:40], io.ErrUnexpectedEOF},
		{"path without NUL", rawHeader(CmdWrite, strings.Repeat("a", 64), 0), ErrInvalid},
		// Only the header is in the stream: the bound must be checked before
		// the payload is read or allocated.
		{"data_len 3072", rawHeader(CmdWrite, "/a", 3072), ErrInvalid},
		{"data_len 4 GiB", rawHeader(CmdWrite, "/a", 0xffffffff), ErrInvalid},
		{"truncated data", append(rawHeader(CmdWrite, "/a", 5), "abc"...), io.ErrUnexpectedEOF},
		{"header only, data missing", rawHeader(RespRead, "/a", 1), io.ErrUnexpectedEOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ReadMessage(bytes.NewReader(tt.input))
			assert.ErrorIs(t, err, tt.isErr)
		})
	}
}

func TestReadMessageMaxValue(t *testing.T) {
	in := append(rawHeader(RespRead, "/a", MaxValueLen), bytes.Repeat([]byte{'x'}, MaxValueLen)...)
	m, err := ReadMessage(bytes.NewReader(in))
	require.NoError(t, err)
	assert.Len(t, m.Data, MaxValueLen)
}

func TestAppendMessageRejects(t *testing.T) {
	_, err := AppendMessage(nil, CmdWrite, "/"+strings.Repeat("a", MaxPathLen), nil)
	assert.ErrorIs(t, err, ErrInvalid, "64-byte path")
	_, err = AppendMessage(nil, CmdWrite, "/a\x00b", nil)
	assert.ErrorIs(t, err, ErrInvalid, "NUL in path")
	_, err = AppendMessage(nil, CmdWrite, "/a", make([]byte, MaxValueLen+1))
	assert.ErrorIs(t, err, ErrInvalid, "value too long")
	assert.ErrorIs(t, WriteMessage(io.Discard, Message{Type: CmdWrite, Path: "/a", Data: make([]byte, 4096)}), ErrInvalid)
}

type failWriter struct{ err error }

func (w failWriter) Write([]byte) (int, error) { return 0, w.err }

func TestWriteMessageWriterError(t *testing.T) {
	err := WriteMessage(failWriter{io.ErrClosedPipe}, Message{Type: RespOK, Path: "/a"})
	assert.ErrorIs(t, err, io.ErrClosedPipe)
}

func TestMsgTypeString(t *testing.T) {
	assert.Equal(t, "READ", CmdRead.String())
	assert.Equal(t, "RESP_WATCH", RespWatch.String())
	assert.Equal(t, "RESP_MULTIREAD", RespMultiread.String())
	assert.Equal(t, "type(255)", MsgType(0xff).String())
	assert.Equal(t, `WRITE "/a" (2 bytes)`, Message{Type: CmdWrite, Path: "/a", Data: []byte("xy")}.String())
}

// FuzzReadMessage feeds arbitrary streams to the decoder: it must never
// panic, must respect the limits, and what it accepts must re-encode to the
// same message.
func FuzzReadMessage(f *testing.F) {
	f.Add(append(rawHeader(CmdWrite, "/qubes-ip", 10), "10.137.0.6"...))
	f.Add(rawHeader(RespMultiread, "", 0))
	f.Add(rawHeader(CmdRm, "/qubes-firewall/10.137.0.3/", 0))
	f.Add(rawHeader(CmdWrite, strings.Repeat("a", 64), 0))
	f.Add(rawHeader(CmdWrite, "/a", 0xffffffff))
	f.Add(append(rawHeader(RespRead, "/a", 5), "ab"...))
	f.Fuzz(func(t *testing.T, in []byte) {
		r := bytes.NewReader(in)
		for range len(in)/HeaderLen + 1 {
			m, err := ReadMessage(r)
			if err != nil {
				return
			}
			if len(m.Path) > MaxPathLen || len(m.Data) > MaxValueLen {
				t.Fatalf("limits not enforced: %v", m)
			}
			var buf bytes.Buffer
			if err := WriteMessage(&buf, m); err != nil {
				t.Fatalf("accepted message does not re-encode: %v: %v", m, err)
			}
			again, err := ReadMessage(&buf)
			if err != nil || again.Type != m.Type || again.Path != m.Path || !bytes.Equal(again.Data, m.Data) {
				t.Fatalf("round trip changed %v into %v (%v)", m, again, err)
			}
			// Validation must not panic on anything the framing accepts.
			_ = CheckVchan(m)
		}
	})
}

func BenchmarkReadMessage(b *testing.B) {
	in := append(rawHeader(CmdWrite, "/qubes-firewall/10.137.0.3/0001", 33), "action=accept proto=tcp dstports=443-443"[:33]...)
	r := bytes.NewReader(in)
	b.ReportAllocs()
	b.SetBytes(int64(len(in)))
	for b.Loop() {
		r.Reset(in)
		if _, err := ReadMessage(r); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkAppendMessage(b *testing.B) {
	buf := make([]byte, 0, HeaderLen+64)
	data := []byte("action=accept proto=tcp")
	b.ReportAllocs()
	for b.Loop() {
		var err error
		if buf, err = AppendMessage(buf[:0], CmdWrite, "/qubes-firewall/10.137.0.3/0001", data); err != nil {
			b.Fatal(err)
		}
	}
}
