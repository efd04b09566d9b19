package sim

import (
	"errors"
	"fmt"
	"io"
	"sync"

	"qfw/xen"
	"qfw/xen/xenstore"
)

// Limits bound what one domain can take from the simulator, so that a
// hostile or buggy domain exhausts its own share and nothing else.
type Limits struct {
	Domains      int // domains alive at once, dom0 included
	Grants       int // pages a domain may have granted (shared) at once
	Mappings     int // foreign pages a domain may have mapped at once
	Ports        int // event channel ports per domain
	StoreNodes   int // xenstore nodes an unprivileged domain may own
	StoreWatches int // watches per xenstore connection
	StoreTxs     int // open transactions per xenstore connection
	StoreTxOps   int // requests per transaction
	StoreQueue   int // replies and events queued for a slow reader before it is disconnected
}

// DefaultLimits are close to Xen's and xenstored's defaults.
func DefaultLimits() Limits {
	return Limits{
		Domains:      256,
		Grants:       16384, // 32 grant frames of 512 v1 entries
		Mappings:     16384,
		Ports:        4096, // 2-level event channel ABI on 64-bit
		StoreNodes:   1000,
		StoreWatches: 128,
		StoreTxs:     10,
		StoreTxOps:   1024,
		StoreQueue:   1024,
	}
}

// Hypervisor is a simulated Xen host. Grant tables and event channels are
// guarded by one lock; xenstore has its own.
type Hypervisor struct {
	lim   Limits
	store *store

	mu      sync.Mutex
	domains map[xen.DomID]*Domain
	nextID  xen.DomID
	dom0    *Domain
}

// New starts a hypervisor with default limits and a running dom0.
func New() *Hypervisor { return NewWithLimits(DefaultLimits()) }

// NewWithLimits starts a hypervisor with the given limits and a running dom0.
func NewWithLimits(lim Limits) *Hypervisor {
	h := &Hypervisor{
		lim:     lim,
		store:   newStore(lim),
		domains: make(map[xen.DomID]*Domain),
	}
	d, err := h.create("Domain-0")
	if err != nil { // a fresh hypervisor always has room for dom0
		panic(err)
	}
	h.dom0 = d
	return h
}

// Dom0 returns the toolstack domain.
func (h *Hypervisor) Dom0() *Domain { return h.dom0 }

// CreateDomain starts a new unprivileged domain with the next free id. Like
// libxl, it writes /local/domain/<id>/{domid,name} (readable by the domain)
// and gives the domain its own data, device, control and error directories.
func (h *Hypervisor) CreateDomain(name string) (*Domain, error) {
	return h.create(name)
}

func (h *Hypervisor) create(name string) (*Domain, error) {
	h.mu.Lock()
	if len(h.domains) >= h.lim.Domains {
		h.mu.Unlock()
		return nil, fmt.Errorf("sim: create domain %q: %w", name, xen.ErrNoMemory)
	}
	for h.domains[h.nextID] != nil { // ids are never 0 again after dom0
		h.nextID++
	}
	d := &Domain{
		h:        h,
		id:       h.nextID,
		name:     name,
		alive:    true,
		grants:   make(map[xen.GrantRef]*grant),
		nextRef:  firstGrantRef,
		shares:   make(map[*share]struct{}),
		mappings: make(map[*mapping]struct{}),
		ports:    make(map[xen.Port]*port),
	}
	h.nextID++
	h.domains[d.id] = d
	h.mu.Unlock()

	if err := h.store.introduce(d.id, name); err != nil {
		h.mu.Lock()
		delete(h.domains, d.id)
		h.mu.Unlock()
		return nil, fmt.Errorf("sim: create domain %q: %w", name, err)
	}
	d.xs = xenstore.NewClient(h.store.connect(d.id))
	return d, nil
}

// Domain returns the live domain with id, if any.
func (h *Hypervisor) Domain(id xen.DomID) (*Domain, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d := h.domains[id]
	return d, d != nil && d.alive
}

// Close destroys every domain and stops xenstore.
func (h *Hypervisor) Close() {
	h.mu.Lock()
	var ds []*Domain
	for _, d := range h.domains {
		if d != h.dom0 {
			ds = append(ds, d)
		}
	}
	h.mu.Unlock()
	for _, d := range ds {
		_ = d.Destroy() // already-destroyed domains are fine here
	}
	h.dom0.xs.Close()
	h.store.close()
}

// Domain is a simulated domain. It implements xen.Domain, xen.GrantTable and
// xen.EventChannels.
type Domain struct {
	h    *Hypervisor
	id   xen.DomID
	name string
	xs   *xenstore.Client

	// Guarded by h.mu.
	alive    bool
	grants   map[xen.GrantRef]*grant // this domain's grant table
	freeRefs []xen.GrantRef
	nextRef  xen.GrantRef
	shares   map[*share]struct{}
	mappings map[*mapping]struct{}
	mapped   int // foreign pages mapped now
	ports    map[xen.Port]*port
}

var _ xen.Domain = (*Domain)(nil)

// ErrDead reports an operation by or on a destroyed domain.
var ErrDead = errors.New("domain destroyed")

func (d *Domain) ID() xen.DomID             { return d.id }
func (d *Domain) Name() string              { return d.name }
func (d *Domain) Store() *xenstore.Client   { return d.xs }
func (d *Domain) Grants() xen.GrantTable    { return d }
func (d *Domain) Events() xen.EventChannels { return d }
func (d *Domain) errf(format string, a ...any) error {
	return fmt.Errorf("sim: dom%d: "+format, append([]any{d.id}, a...)...)
}

// ConnectStore opens an extra raw xenstore connection for this domain, for
// tests that speak the wire protocol themselves (and may misbehave).
func (d *Domain) ConnectStore() io.ReadWriteCloser {
	return d.h.store.connect(d.id)
}

// Destroy kills the domain as the hypervisor does: its mappings are unmapped
// and its grants revoked (running their close notifications, so peers see
// vchan live flags drop), its event channels closed (peers' ports become
// unbound), its xenstore home removed and @releaseDomain fired. Pages it
// granted stay readable by peers until they unmap them.
func (d *Domain) Destroy() error {
	if d == d.h.dom0 {
		return d.errf("destroy: dom0 cannot be destroyed")
	}
	h := d.h
	h.mu.Lock()
	if !d.alive {
		h.mu.Unlock()
		return d.errf("destroy: %w", ErrDead)
	}
	for m := range d.mappings {
		m.closeLocked()
	}
	for s := range d.shares {
		s.closeLocked()
	}
	for _, p := range d.ports {
		p.closeLocked()
	}
	d.alive = false
	h.mu.Unlock()

	d.xs.Close()
	h.store.release(d.id)

	h.mu.Lock()
	delete(h.domains, d.id)
	h.mu.Unlock()
	return nil
}
