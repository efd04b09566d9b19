// Package xenstore speaks the xenstore wire protocol (xsd_sockmsg, Xen's
// io/xs_wire.h): the message codec, the payload encodings, and a client that
// runs over any byte stream carrying whole messages (/dev/xen/xenbus on Linux,
// an in-memory connection in the simulator).
package xenstore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// DomID is a Xen domain id. Package xen re-exports it as xen.DomID.
type DomID uint16

// Op is the type field of a message.
type Op uint32

// Message types (xs_wire.h enum xsd_sockmsg_type).
const (
	OpControl            Op = 0
	OpDirectory          Op = 1
	OpRead               Op = 2
	OpGetPerms           Op = 3
	OpWatch              Op = 4
	OpUnwatch            Op = 5
	OpTransactionStart   Op = 6
	OpTransactionEnd     Op = 7
	OpIntroduce          Op = 8
	OpRelease            Op = 9
	OpGetDomainPath      Op = 10
	OpWrite              Op = 11
	OpMkdir              Op = 12
	OpRm                 Op = 13
	OpSetPerms           Op = 14
	OpWatchEvent         Op = 15
	OpError              Op = 16
	OpIsDomainIntroduced Op = 17
	OpResume             Op = 18
	OpSetTarget          Op = 19
	OpResetWatches       Op = 21
	OpDirectoryPart      Op = 22
)

var opNames = [...]string{
	OpControl: "CONTROL", OpDirectory: "DIRECTORY", OpRead: "READ",
	OpGetPerms: "GET_PERMS", OpWatch: "WATCH", OpUnwatch: "UNWATCH",
	OpTransactionStart: "TRANSACTION_START", OpTransactionEnd: "TRANSACTION_END",
	OpIntroduce: "INTRODUCE", OpRelease: "RELEASE", OpGetDomainPath: "GET_DOMAIN_PATH",
	OpWrite: "WRITE", OpMkdir: "MKDIR", OpRm: "RM", OpSetPerms: "SET_PERMS",
	OpWatchEvent: "WATCH_EVENT", OpError: "ERROR",
	OpIsDomainIntroduced: "IS_DOMAIN_INTRODUCED", OpResume: "RESUME",
	OpSetTarget: "SET_TARGET", OpResetWatches: "RESET_WATCHES",
	OpDirectoryPart: "DIRECTORY_PART",
}

func (o Op) String() string {
	if int(o) < len(opNames) && opNames[o] != "" {
		return opNames[o]
	}
	return fmt.Sprintf("Op(%d)", uint32(o))
}

// Protocol limits (xs_wire.h).
const (
	HeaderLen  = 16
	MaxPayload = 4096 // XENSTORE_PAYLOAD_MAX, each direction
	MaxAbsPath = 3072 // XENSTORE_ABS_PATH_MAX
	MaxRelPath = 2048 // XENSTORE_REL_PATH_MAX
)

// Header is a view of the 16-byte struct xsd_sockmsg.
type Header []byte

func (h Header) Op() Op            { return Op(binary.LittleEndian.Uint32(h[0:])) }
func (h Header) ReqID() uint32     { return binary.LittleEndian.Uint32(h[4:]) }
func (h Header) TxID() uint32      { return binary.LittleEndian.Uint32(h[8:]) }
func (h Header) Len() uint32       { return binary.LittleEndian.Uint32(h[12:]) }
func (h Header) SetOp(o Op)        { binary.LittleEndian.PutUint32(h[0:], uint32(o)) }
func (h Header) SetReqID(v uint32) { binary.LittleEndian.PutUint32(h[4:], v) }
func (h Header) SetTxID(v uint32)  { binary.LittleEndian.PutUint32(h[8:], v) }
func (h Header) SetLen(v uint32)   { binary.LittleEndian.PutUint32(h[12:], v) }

// Msg is one decoded message.
type Msg struct {
	Op      Op
	ReqID   uint32
	TxID    uint32
	Payload []byte
}

// ErrTooLong reports a message whose payload exceeds MaxPayload; xenstored
// drops the connection of a peer that sends one.
var ErrTooLong = errors.New("xenstore: payload exceeds 4096 bytes")

// ReadMsg reads one message from r into buf, which must hold at least
// HeaderLen+MaxPayload bytes. The returned payload aliases buf.
func ReadMsg(r io.Reader, buf []byte) (Msg, error) {
	if len(buf) < HeaderLen+MaxPayload {
		return Msg{}, errors.New("xenstore: read buffer too small")
	}
	h := Header(buf[:HeaderLen])
	if _, err := io.ReadFull(r, h); err != nil {
		return Msg{}, err
	}
	n := h.Len()
	if n > MaxPayload {
		return Msg{}, fmt.Errorf("%w (%s with %d bytes)", ErrTooLong, h.Op(), n)
	}
	p := buf[HeaderLen : HeaderLen+int(n)]
	if _, err := io.ReadFull(r, p); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return Msg{}, err
	}
	return Msg{Op: h.Op(), ReqID: h.ReqID(), TxID: h.TxID(), Payload: p}, nil
}

// AppendMsg appends the encoding of m to dst.
func AppendMsg(dst []byte, m Msg) ([]byte, error) {
	if len(m.Payload) > MaxPayload {
		return dst, fmt.Errorf("%w (%s with %d bytes)", ErrTooLong, m.Op, len(m.Payload))
	}
	var hb [HeaderLen]byte
	h := Header(hb[:])
	h.SetOp(m.Op)
	h.SetReqID(m.ReqID)
	h.SetTxID(m.TxID)
	h.SetLen(uint32(len(m.Payload)))
	return append(append(dst, hb[:]...), m.Payload...), nil
}
