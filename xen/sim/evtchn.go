package sim

import (
	"qfw/xen"
)

// port is one event channel port of a domain. Its state is guarded by h.mu.
type port struct {
	d          *Domain
	num        xen.Port
	remote     xen.DomID // the domain allowed to bind (unbound) or bound to
	remotePort xen.Port  // 0 while unbound
	closed     bool
	c          chan struct{} // cap 1: the pending bit
}

// AllocUnbound opens a port that remote may bind to.
func (d *Domain) AllocUnbound(remote xen.DomID) (xen.EventChannel, error) {
	h := d.h
	h.mu.Lock()
	defer h.mu.Unlock()
	if !d.alive {
		return nil, d.errf("alloc unbound port: %w", ErrDead)
	}
	if r := h.domains[remote]; r == nil || !r.alive {
		return nil, d.errf("alloc unbound port for dom%d: no such domain", remote)
	}
	return d.newPortLocked(remote)
}

// BindInterdomain binds to remote's unbound port rport, which remote must
// have allocated for d.
func (d *Domain) BindInterdomain(remote xen.DomID, rport xen.Port) (xen.EventChannel, error) {
	h := d.h
	h.mu.Lock()
	defer h.mu.Unlock()
	if !d.alive {
		return nil, d.errf("bind interdomain: %w", ErrDead)
	}
	r := h.domains[remote]
	if r == nil || !r.alive {
		return nil, d.errf("bind to dom%d port %d: no such domain", remote, rport)
	}
	rp := r.ports[rport]
	if rp == nil || rp.remotePort != 0 || rp.remote != d.id {
		return nil, d.errf("bind to dom%d port %d: port is not unbound for dom%d", remote, rport, d.id)
	}
	p, err := d.newPortLocked(remote)
	if err != nil {
		return nil, err
	}
	p.remotePort = rport
	rp.remotePort = p.num
	return p, nil
}

func (d *Domain) newPortLocked(remote xen.DomID) (*port, error) {
	for n := xen.Port(1); int(n) <= d.h.lim.Ports; n++ {
		if d.ports[n] == nil {
			p := &port{d: d, num: n, remote: remote, c: make(chan struct{}, 1)}
			d.ports[n] = p
			return p, nil
		}
	}
	return nil, d.errf("allocate event channel: %w (%d ports)", xen.ErrNoMemory, len(d.ports))
}

func (p *port) Port() xen.Port     { return p.num }
func (p *port) C() <-chan struct{} { return p.c }

func (p *port) Notify() error {
	p.d.h.mu.Lock()
	defer p.d.h.mu.Unlock()
	return p.notifyLocked()
}

func (p *port) notifyLocked() error {
	switch {
	case p.closed:
		return p.d.errf("notify port %d: %w", p.num, xen.ErrPortClosed)
	case p.remotePort == 0:
		return p.d.errf("notify port %d: %w", p.num, xen.ErrPortUnbound)
	}
	rp := p.d.h.domains[p.remote].ports[p.remotePort]
	select {
	case rp.c <- struct{}{}:
	default: // already pending
	}
	return nil
}

// Close frees the port; a bound peer's port becomes unbound again, as in Xen.
func (p *port) Close() error {
	p.d.h.mu.Lock()
	defer p.d.h.mu.Unlock()
	if p.closed {
		return p.d.errf("close port %d: %w", p.num, xen.ErrPortClosed)
	}
	p.closeLocked()
	return nil
}

func (p *port) closeLocked() {
	p.closed = true
	if p.remotePort != 0 {
		if r := p.d.h.domains[p.remote]; r != nil {
			if rp := r.ports[p.remotePort]; rp != nil {
				rp.remotePort = 0
			}
		}
	}
	delete(p.d.ports, p.num)
}
