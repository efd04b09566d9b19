// Package ring implements the Xen shared ring of io/ring.h: one page with
// four free-running indices and a slot array shared by requests and
// responses. The frontend owns the page and produces requests; the backend
// consumes them and produces responses in the same slots.
//
// Request and response types are byte arrays (e.g. type TxRequest [12]byte
// with getter methods); the slot size is the larger of the two. Consume
// copies a slot out of shared memory once, so callers only ever validate a
// private copy the peer can no longer change.
package ring

import (
	"errors"
	"fmt"
	"reflect"
	"unsafe"

	"qfw/xen"
)

// Shared page layout (struct NAME_sring).
const (
	offReqProd  = 0
	offReqEvent = 4
	offRspProd  = 8
	offRspEvent = 12
	// HeaderLen is the offset of the slot array.
	HeaderLen = 64
)

var (
	// ErrFull reports a Produce on a front ring with no free slot.
	ErrFull = errors.New("ring: full")
	// ErrNoRequest reports a backend response with no consumed request to
	// answer.
	ErrNoRequest = errors.New("ring: response without a request")
	// ErrOverflow reports a peer that published more entries than the
	// protocol allows; the ring is unusable from then on.
	ErrOverflow = errors.New("ring: peer producer index overflows the ring")
)

// Entries is the number of slots of a one-page ring with slots of slot
// bytes: the largest power of two that fits (__CONST_RING_SIZE).
func Entries(slot int) int {
	n := (xen.PageSize - HeaderLen) / slot
	p := 1
	for p*2 <= n {
		p *= 2
	}
	return p
}

// endpoint is the private state of one side.
type endpoint struct {
	page      []byte
	n         uint32  // slots
	slot      uintptr // slot size
	prodPvt   uint32  // next slot we produce into
	pushed    uint32  // what we last published
	cons      uint32  // next slot we consume
	prodOff   int     // our producer index
	eventOff  int     // peer's "notify me past here", read when pushing
	peerProd  int     // peer's producer index
	peerEvent int     // our "notify me past here", set by FinalCheck
	front     bool
	err       error // sticky ErrOverflow
}

// byteArraySize returns the size of T, which must be an array of bytes:
// peer memory is reinterpreted as T, so T must hold no pointers.
func byteArraySize[T any]() (uintptr, error) {
	t := reflect.TypeFor[T]()
	if t.Kind() != reflect.Array || t.Elem().Kind() != reflect.Uint8 || t.Len() == 0 {
		return 0, fmt.Errorf("ring: slot type %v is not a non-empty byte array", t)
	}
	return t.Size(), nil
}

func newEndpoint[Req, Rsp any](page []byte, front bool) (endpoint, error) {
	rq, err := byteArraySize[Req]()
	if err != nil {
		return endpoint{}, err
	}
	rs, err := byteArraySize[Rsp]()
	if err != nil {
		return endpoint{}, err
	}
	slot := max(rq, rs)
	if len(page) != xen.PageSize || slot > xen.PageSize-HeaderLen {
		return endpoint{}, fmt.Errorf("ring: %d-byte slots in a %d-byte page", slot, len(page))
	}
	if uintptr(unsafe.Pointer(&page[0]))%4 != 0 {
		return endpoint{}, errors.New("ring: page not 4-byte aligned")
	}
	e := endpoint{page: page, n: uint32(Entries(int(slot))), slot: slot, front: front}
	if front {
		e.prodOff, e.eventOff, e.peerProd, e.peerEvent = offReqProd, offReqEvent, offRspProd, offRspEvent
	} else {
		e.prodOff, e.eventOff, e.peerProd, e.peerEvent = offRspProd, offRspEvent, offReqProd, offReqEvent
	}
	return e, nil
}

func (e *endpoint) word(off int) uint32       { return xen.Word(e.page, off).Load() }
func (e *endpoint) setWord(off int, v uint32) { xen.Word(e.page, off).Store(v) }

func (e *endpoint) slotPtr(i uint32) unsafe.Pointer {
	return unsafe.Pointer(&e.page[HeaderLen+uintptr(i&(e.n-1))*e.slot])
}

// pending returns how many entries the peer has published that we have not
// consumed, after checking that the peer stayed within the protocol: a
// frontend may not have more requests in the ring than it has free slots,
// a backend may not answer requests that were never pushed.
func (e *endpoint) pending() (uint32, error) {
	if e.err != nil {
		return 0, e.err
	}
	prod := e.word(e.peerProd)
	avail := prod - e.cons
	var limit uint32
	if e.front {
		limit = e.pushed - e.cons
	} else {
		limit = e.n - (e.cons - e.prodPvt)
	}
	if avail > limit {
		e.err = fmt.Errorf("%w: producer %d, consumer %d, at most %d allowed", ErrOverflow, prod, e.cons, limit)
		return 0, e.err
	}
	return avail, nil
}

// push publishes produced entries and reports whether the peer asked to be
// notified of them (RING_PUSH_*_AND_CHECK_NOTIFY).
func (e *endpoint) push() bool {
	old, cur := e.pushed, e.prodPvt
	e.setWord(e.prodOff, cur) // atomic store: entries are visible first
	e.pushed = cur
	return cur-e.word(e.eventOff) < cur-old
}

// finalCheck asks for a notification when the peer produces more and
// reports whether something arrived meanwhile (RING_FINAL_CHECK_FOR_*).
func (e *endpoint) finalCheck() (bool, error) {
	if n, err := e.pending(); n > 0 || err != nil {
		return n > 0, err
	}
	e.setWord(e.peerEvent, e.cons+1)
	n, err := e.pending()
	return n > 0, err
}

// Front is the frontend side: it produces Req and consumes Rsp.
type Front[Req, Rsp any] struct{ e endpoint }

// NewFront initialises page as an empty ring (SHARED_RING_INIT) and returns
// its frontend. The page is the frontend's, granted to the backend.
func NewFront[Req, Rsp any](page []byte) (*Front[Req, Rsp], error) {
	e, err := newEndpoint[Req, Rsp](page, true)
	if err != nil {
		return nil, err
	}
	clear(page[:HeaderLen])
	e.setWord(offReqEvent, 1)
	e.setWord(offRspEvent, 1)
	e.setWord(offReqProd, 0)
	e.setWord(offRspProd, 0)
	return &Front[Req, Rsp]{e}, nil
}

// Size is the number of slots.
func (f *Front[Req, Rsp]) Size() int { return int(f.e.n) }

// Free is the number of requests that can be produced now.
func (f *Front[Req, Rsp]) Free() int { return int(f.e.n - (f.e.prodPvt - f.e.cons)) }

// Produce writes a request into the next slot; Push publishes it.
func (f *Front[Req, Rsp]) Produce(r Req) error {
	if f.Free() == 0 {
		return ErrFull
	}
	*(*Req)(f.e.slotPtr(f.e.prodPvt)) = r
	f.e.prodPvt++
	return nil
}

// Push publishes the produced requests and reports whether to notify the
// backend.
func (f *Front[Req, Rsp]) Push() (notify bool) { return f.e.push() }

// Pending is the number of responses waiting to be consumed.
func (f *Front[Req, Rsp]) Pending() (int, error) {
	n, err := f.e.pending()
	return int(n), err
}

// Consume copies the next response out of the ring; ok is false if there
// is none. ErrOverflow means the backend broke the protocol.
func (f *Front[Req, Rsp]) Consume() (r Rsp, ok bool, err error) {
	n, err := f.e.pending()
	if n == 0 || err != nil {
		return r, false, err
	}
	r = *(*Rsp)(f.e.slotPtr(f.e.cons))
	f.e.cons++
	return r, true, nil
}

// FinalCheck is called when Consume found nothing, before sleeping: it asks
// the backend to notify on its next response and reports whether one
// arrived meanwhile (then consume again instead of sleeping).
func (f *Front[Req, Rsp]) FinalCheck() (bool, error) { return f.e.finalCheck() }

// Back is the backend side: it consumes Req and produces Rsp.
type Back[Req, Rsp any] struct{ e endpoint }

// NewBack attaches to a ring the frontend initialised (BACK_RING_INIT).
func NewBack[Req, Rsp any](page []byte) (*Back[Req, Rsp], error) {
	e, err := newEndpoint[Req, Rsp](page, false)
	if err != nil {
		return nil, err
	}
	return &Back[Req, Rsp]{e}, nil
}

// Size is the number of slots.
func (b *Back[Req, Rsp]) Size() int { return int(b.e.n) }

// Pending is the number of requests waiting to be consumed.
func (b *Back[Req, Rsp]) Pending() (int, error) {
	n, err := b.e.pending()
	return int(n), err
}

// Consume copies the next request out of the ring; ok is false if there is
// none. ErrOverflow means the frontend broke the protocol.
func (b *Back[Req, Rsp]) Consume() (r Req, ok bool, err error) {
	n, err := b.e.pending()
	if n == 0 || err != nil {
		return r, false, err
	}
	r = *(*Req)(b.e.slotPtr(b.e.cons))
	b.e.cons++
	return r, true, nil
}

// Produce writes a response into the slot of the oldest unanswered request;
// Push publishes it.
func (b *Back[Req, Rsp]) Produce(r Rsp) error {
	if b.e.prodPvt == b.e.cons {
		return ErrNoRequest
	}
	*(*Rsp)(b.e.slotPtr(b.e.prodPvt)) = r
	b.e.prodPvt++
	return nil
}

// Push publishes the produced responses and reports whether to notify the
// frontend.
func (b *Back[Req, Rsp]) Push() (notify bool) { return b.e.push() }

// FinalCheck is called when Consume found nothing, before sleeping.
func (b *Back[Req, Rsp]) FinalCheck() (bool, error) { return b.e.finalCheck() }
