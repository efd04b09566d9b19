package qubesdb

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Sizes of struct qdb_hdr and its limits (qubesdb.h, db-cmds.c).
const (
	// HeaderLen is the size of the header that precedes every message: type
	// (1 byte), path (64 bytes), padding (3 bytes), data length (4 bytes LE).
	HeaderLen = 72
	// MaxPathLen is the longest path in bytes; the 64-byte field keeps a NUL.
	MaxPathLen = pathFieldLen - 1
	// MaxValueLen is the largest value in bytes: the daemon rejects
	// data_len >= 3072.
	MaxValueLen = 3071

	typeOffset    = 0
	pathOffset    = 1
	pathFieldLen  = 64
	dataLenOffset = 68
)

// MsgType is the type byte of a message (enum qdb_msg).
type MsgType uint8

// The message types, in enum order.
const (
	CmdRead MsgType = iota
	CmdWrite
	CmdMultiread
	CmdList
	CmdRm
	CmdWatch
	CmdUnwatch
	RespOK
	RespErrorNoent
	RespError
	RespRead
	RespMultiread
	RespList
	RespWatch
)

var msgTypeNames = [...]string{
	CmdRead:        "READ",
	CmdWrite:       "WRITE",
	CmdMultiread:   "MULTIREAD",
	CmdList:        "LIST",
	CmdRm:          "RM",
	CmdWatch:       "WATCH",
	CmdUnwatch:     "UNWATCH",
	RespOK:         "RESP_OK",
	RespErrorNoent: "RESP_ERROR_NOENT",
	RespError:      "RESP_ERROR",
	RespRead:       "RESP_READ",
	RespMultiread:  "RESP_MULTIREAD",
	RespList:       "RESP_LIST",
	RespWatch:      "RESP_WATCH",
}

func (t MsgType) String() string {
	if int(t) < len(msgTypeNames) {
		return msgTypeNames[t]
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// ErrInvalid is wrapped by every error about a malformed message or a value
// that breaks the protocol's rules.
var ErrInvalid = errors.New("invalid QubesDB message")

// Header is a view of the 72-byte message header.
type Header []byte

// Type returns the message type.
func (h Header) Type() MsgType { return MsgType(h[typeOffset]) }

// SetType sets the message type.
func (h Header) SetType(t MsgType) { h[typeOffset] = byte(t) }

// Path returns the path field up to its first NUL, and false if the field
// holds no NUL at all.
func (h Header) Path() ([]byte, bool) {
	field := h[pathOffset : pathOffset+pathFieldLen]
	n := bytes.IndexByte(field, 0)
	if n < 0 {
		return field, false
	}
	return field[:n], true
}

// SetPath stores p NUL-padded; p must be at most MaxPathLen bytes.
func (h Header) SetPath(p string) {
	field := h[pathOffset : pathOffset+pathFieldLen]
	clear(field[copy(field[:MaxPathLen], p):])
}

// DataLen returns the length of the payload that follows the header.
func (h Header) DataLen() uint32 {
	return binary.LittleEndian.Uint32(h[dataLenOffset:])
}

// SetDataLen sets the payload length.
func (h Header) SetDataLen(n uint32) {
	binary.LittleEndian.PutUint32(h[dataLenOffset:], n)
}

// Message is one decoded message.
type Message struct {
	Type MsgType
	Path string
	Data []byte
}

func (m Message) String() string {
	return fmt.Sprintf("%v %q (%d bytes)", m.Type, m.Path, len(m.Data))
}

// ReadMessage reads one message from a byte stream. It checks only the
// framing: a NUL-terminated path and a payload shorter than 3072 bytes,
// checked before the payload is allocated. What the message means is for
// the caller to validate.
func ReadMessage(r io.Reader) (Message, error) {
	var hb [HeaderLen]byte
	if _, err := io.ReadFull(r, hb[:]); err != nil {
		return Message{}, err
	}
	h := Header(hb[:])
	path, ok := h.Path()
	if !ok {
		return Message{}, fmt.Errorf("%w: %v path is not NUL-terminated", ErrInvalid, h.Type())
	}
	n := h.DataLen()
	if n > MaxValueLen {
		return Message{}, fmt.Errorf("%w: %v %q has data_len %d, limit %d", ErrInvalid, h.Type(), path, n, MaxValueLen)
	}
	m := Message{Type: h.Type(), Path: string(path)}
	if n > 0 {
		m.Data = make([]byte, n)
		if _, err := io.ReadFull(r, m.Data); err != nil {
			return Message{}, fmt.Errorf("reading %d data bytes of %v %q: %w", n, m.Type, m.Path, noEOF(err))
		}
	}
	return m, nil
}

// noEOF turns a clean EOF inside a message into ErrUnexpectedEOF.
func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// AppendMessage appends the encoding of a message to b. The path must fit in
// the header and the data must fit the value limit.
func AppendMessage(b []byte, t MsgType, path string, data []byte) ([]byte, error) {
	if len(path) > MaxPathLen || strings.IndexByte(path, 0) >= 0 {
		return b, fmt.Errorf("%w: path %q does not fit a header", ErrInvalid, path)
	}
	if len(data) > MaxValueLen {
		return b, fmt.Errorf("%w: %d data bytes for %q, limit %d", ErrInvalid, len(data), path, MaxValueLen)
	}
	start := len(b)
	b = append(b, make([]byte, HeaderLen)...)
	h := Header(b[start:])
	h.SetType(t)
	h.SetPath(path)
	h.SetDataLen(uint32(len(data)))
	return append(b, data...), nil
}

// WriteMessage writes one message with a single Write call, so that a
// message is never interleaved with another writer's bytes.
func WriteMessage(w io.Writer, m Message) error {
	b, err := AppendMessage(make([]byte, 0, HeaderLen+len(m.Data)), m.Type, m.Path, m.Data)
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}
