//go:build linux

package linux

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"qfw/xen"
	"qfw/xen/xenstore"
)

// Domain is the domain this program runs in, seen through /dev/xen.
type Domain struct {
	id  xen.DomID
	xs  *xenstore.Client
	ev  *events
	gnt *grants
}

var _ xen.Domain = (*Domain)(nil)

// Open opens the Xen devices and learns our domain id from xenstore.
func Open(ctx context.Context) (d *Domain, err error) {
	f, err := openDev("xenbus")
	if err != nil {
		return nil, err
	}
	d = &Domain{xs: xenstore.NewClient(f)}
	defer func() {
		if err != nil {
			d.Close()
		}
	}()
	v, err := d.xs.Read(ctx, "domid")
	if err != nil {
		return nil, fmt.Errorf("xen/linux: read own domid: %w", err)
	}
	id, err := strconv.ParseUint(string(v), 10, 16)
	if err != nil {
		return nil, fmt.Errorf("xen/linux: own domid %q: %w", v, err)
	}
	d.id = xen.DomID(id)
	if d.ev, err = openEvents(); err != nil {
		return nil, err
	}
	if d.gnt, err = openGrants(); err != nil {
		return nil, err
	}
	return d, nil
}

func (d *Domain) ID() xen.DomID             { return d.id }
func (d *Domain) Store() *xenstore.Client   { return d.xs }
func (d *Domain) Grants() xen.GrantTable    { return d.gnt }
func (d *Domain) Events() xen.EventChannels { return d.ev }

// Close closes the devices. The kernel then unbinds our ports, unmaps what
// we mapped, and ends our grants once peers unmap them.
func (d *Domain) Close() error {
	errs := []error{d.xs.Close()}
	if d.ev != nil {
		errs = append(errs, d.ev.close())
	}
	if d.gnt != nil {
		errs = append(errs, d.gnt.close())
	}
	return errors.Join(errs...)
}
