// Package xen defines the hypervisor primitives qfw is built on (grant
// tables, event channels, xenstore) as small interfaces, so that the protocol
// code above them (xen/ring, xen/vchan, netback, netfront) runs unchanged on
// the real /dev/xen devices (xen/linux) and on the in-memory simulator
// (xen/sim).
package xen

import (
	"errors"
	"fmt"

	"qfw/xen/xenstore"
)

// PageSize is the Xen page size, 4 KiB whatever the guest's page size.
const PageSize = 4096

// DomID is a domain id; domain 0 is the toolstack domain.
type DomID = xenstore.DomID

// Dom0 is the privileged toolstack domain.
const Dom0 DomID = 0

// GrantRef names one entry of a domain's grant table.
type GrantRef uint32

// Port is an event channel port, local to one domain. Port 0 is never valid.
type Port uint32

// Domain is one domain's view of the hypervisor.
type Domain interface {
	ID() DomID
	// Store is this domain's xenstore connection; relative paths resolve
	// under /local/domain/<ID>.
	Store() *xenstore.Client
	Grants() GrantTable
	Events() EventChannels
}

// GrantTable shares this domain's pages with others and maps theirs.
type GrantTable interface {
	// Share allocates count zeroed pages and grants them to peer, writable
	// or read-only.
	Share(peer DomID, count int, writable bool) (Share, error)
	// Map maps pages that peer granted to this domain. Mapping writable
	// fails on a read-only grant.
	Map(peer DomID, refs []GrantRef, writable bool) (Mapping, error)
	// Copy runs a batch of grant copies. It fails as a whole only when the
	// batch could not be attempted; each op's outcome is in its Status.
	Copy(ops []CopyOp) error
}

// Pages is memory shared between two domains, one slice per 4 KiB page.
// Pages need not be contiguous. Peer-written bytes must be copied once before
// being validated and used; 32-bit words shared with the peer must be
// accessed through Word.
type Pages interface {
	Pages() [][]byte
	// NotifyOnClose arranges that when this side lets go of the pages (by
	// Close, or because the domain or process died), the byte at offset
	// (counted from the first page) is cleared and an event is sent on
	// port, a channel bound by this domain. Linux's unmap notify.
	NotifyOnClose(offset int, port Port) error
	Close() error
}

// Share is memory this domain granted to a peer.
type Share interface {
	Pages
	// Refs returns the grant references, one per page, to give the peer.
	Refs() []GrantRef
}

// Mapping is memory a peer granted to this domain, mapped here. Closing it
// unmaps the pages.
type Mapping interface {
	Pages
}

// CopyOp is one grant copy between a local buffer and a page granted by Dom.
type CopyOp struct {
	Dom     DomID
	Ref     GrantRef
	Offset  int    // byte offset in the granted page; Offset+len(Buf) <= PageSize
	Buf     []byte // local memory; len(Buf) bytes are copied
	ToGrant bool   // copy Buf into the grant; else copy the grant into Buf
	Status  GrantStatus
}

// EventChannels allocates and binds interdomain event channels.
type EventChannels interface {
	// AllocUnbound opens a port that domain remote may bind to; publish
	// its number for the peer.
	AllocUnbound(remote DomID) (EventChannel, error)
	// BindInterdomain connects to the unbound port remotePort of remote.
	BindInterdomain(remote DomID, remotePort Port) (EventChannel, error)
}

// EventChannel is one local port.
type EventChannel interface {
	Port() Port
	// Notify sends an event to the remote end. It fails with
	// ErrPortUnbound when no remote end is bound and ErrPortClosed after
	// Close.
	Notify() error
	// C receives a value when events arrived since the last receive;
	// events coalesce and wake-ups may be spurious, so re-check shared
	// state after each receive.
	C() <-chan struct{}
	Close() error
}

var (
	// ErrPortClosed reports use of a port that this domain closed or never
	// had (Xen: EINVAL).
	ErrPortClosed = errors.New("event channel port closed")
	// ErrPortUnbound reports a notify on a port with no remote end: the
	// peer has not bound yet or has closed. Xen drops such events silently;
	// the simulator reports them so that callers notice a vanished peer.
	ErrPortUnbound = errors.New("event channel port has no remote end")
	// ErrNoMemory reports a domain out of pages, grant entries, mappings or
	// ports.
	ErrNoMemory = errors.New("domain limit reached")
)

// GrantStatus is a grant operation's outcome (GNTST_*).
type GrantStatus int16

// Grant operation results (grant_table.h).
const (
	GrantOkay             GrantStatus = 0
	GrantGeneralError     GrantStatus = -1
	GrantBadDomain        GrantStatus = -2
	GrantBadRef           GrantStatus = -3
	GrantBadHandle        GrantStatus = -4
	GrantBadVirtAddr      GrantStatus = -5
	GrantBadDevAddr       GrantStatus = -6
	GrantNoDeviceSpace    GrantStatus = -7
	GrantPermissionDenied GrantStatus = -8
	GrantBadPage          GrantStatus = -9
	GrantBadCopyArg       GrantStatus = -10
	GrantAddressTooBig    GrantStatus = -11
	GrantEagain           GrantStatus = -12
	GrantNoSpace          GrantStatus = -13
)

var grantStatusNames = [...]string{
	"okay", "general error", "bad domain", "bad grant reference", "bad handle",
	"bad virtual address", "bad device address", "no device space",
	"permission denied", "bad page", "bad copy argument", "address too big",
	"try again", "no space",
}

// Error makes a failed status usable as an error; compare with errors.Is.
func (s GrantStatus) Error() string {
	if s <= 0 && int(-s) < len(grantStatusNames) {
		return "grant " + grantStatusNames[-s]
	}
	return fmt.Sprintf("grant status %d", int16(s))
}

// Err returns nil for GrantOkay and s otherwise.
func (s GrantStatus) Err() error {
	if s == GrantOkay {
		return nil
	}
	return s
}
