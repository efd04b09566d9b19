package sim

import (
	"maps"
	"sort"
	"strconv"
	"strings"

	"qfw/xen"
	"qfw/xen/xenstore"
)

// node is one xenstore node.
type node struct {
	value    []byte
	perms    []xenstore.Perm // perms[0] is the owner and the default
	children map[string]*node
	gen      uint64 // changes whenever the node or its child list changes
}

func (n *node) clone() *node {
	c := &node{value: n.value, perms: n.perms, gen: n.gen}
	if len(n.children) > 0 {
		c.children = make(map[string]*node, len(n.children))
		for k, v := range n.children {
			c.children[k] = v.clone()
		}
	}
	return c
}

// perm returns what node n allows domain d, as xenstored does: dom0 and the
// owner may do everything; others get their ACL entry or the default.
func (n *node) perm(d xen.DomID) xenstore.Access {
	if d == xen.Dom0 || n.perms[0].Dom == d {
		return xenstore.AccessBoth
	}
	return xenstore.AccessFor(n.perms, d)
}

// change is one modification, reported to the watch machinery.
type change struct {
	path    string
	node    *node // the node after the change, or the removed node
	removed bool
}

// tree is the main xenstore tree or a transaction's snapshot of it. Values
// and perm slices are never modified in place, so snapshots share them.
type tree struct {
	root  *node
	owned map[xen.DomID]int // nodes per unprivileged owner, for quotas
	gen   uint64
	quota int

	// Transaction snapshots only: first-seen generation of every path the
	// transaction touched (0 = absent), checked against the main tree at
	// commit.
	seen map[string]uint64
	// Main tree only: receives every change.
	changed func(change)
}

func newTree(quota int) *tree {
	return &tree{
		root:  &node{perms: []xenstore.Perm{{Dom: xen.Dom0, Access: xenstore.AccessNone}}},
		owned: make(map[xen.DomID]int),
		quota: quota,
	}
}

// clone deep-copies the nodes and the quota counts.
func (t *tree) clone() *tree {
	return &tree{root: t.root.clone(), owned: maps.Clone(t.owned), gen: t.gen, quota: t.quota}
}

// snapshot is a clone that records what a transaction touches.
func (t *tree) snapshot() *tree {
	c := t.clone()
	c.seen = make(map[string]uint64)
	return c
}

func split(path string) []string {
	if path == "/" {
		return nil
	}
	return strings.Split(path[1:], "/")
}

func parentOf(path string) string {
	i := strings.LastIndexByte(path, '/')
	if i == 0 {
		return "/"
	}
	return path[:i]
}

func (t *tree) lookup(path string) *node {
	n := t.root
	for _, c := range split(path) {
		if n = n.children[c]; n == nil {
			return nil
		}
	}
	return n
}

// touch records, in a transaction, the state of path before first use.
func (t *tree) touch(path string) *node {
	n := t.lookup(path)
	if t.seen != nil {
		if _, ok := t.seen[path]; !ok {
			var g uint64
			if n != nil {
				g = n.gen
			}
			t.seen[path] = g
		}
	}
	return n
}

func (t *tree) bump(n *node) {
	t.gen++
	n.gen = t.gen
}

func (t *tree) notify(c change) {
	if t.changed != nil {
		t.changed(c)
	}
}

func (t *tree) readable(d xen.DomID, path string) (*node, error) {
	n := t.touch(path)
	if n == nil {
		return nil, xenstore.ENOENT
	}
	if !n.perm(d).CanRead() {
		return nil, xenstore.EACCES
	}
	return n, nil
}

func (t *tree) read(d xen.DomID, path string) ([]byte, error) {
	n, err := t.readable(d, path)
	if err != nil {
		return nil, err
	}
	return n.value, nil
}

func (t *tree) directory(d xen.DomID, path string) ([]string, error) {
	n, err := t.readable(d, path)
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(n.children))
	for k := range n.children {
		names = append(names, k)
	}
	sort.Strings(names)
	return names, nil
}

func (t *tree) getPerms(d xen.DomID, path string) ([]xenstore.Perm, error) {
	n, err := t.readable(d, path)
	if err != nil {
		return nil, err
	}
	return n.perms, nil
}

// create makes path and missing ancestors on behalf of d, which needs write
// access to the nearest existing ancestor. New nodes inherit their parent's
// permissions; an unprivileged creator becomes their owner.
func (t *tree) create(d xen.DomID, path string) (*node, error) {
	comps := split(path)
	n, i := t.root, 0
	for ; i < len(comps); i++ {
		c := n.children[comps[i]]
		if c == nil {
			break
		}
		n = c
	}
	t.touch("/" + strings.Join(comps[:i], "/"))
	if !n.perm(d).CanWrite() {
		return nil, xenstore.EACCES
	}
	if d != xen.Dom0 && t.owned[d]+len(comps)-i > t.quota {
		return nil, xenstore.ENOSPC
	}
	for ; i < len(comps); i++ {
		t.touch("/" + strings.Join(comps[:i+1], "/"))
		perms := n.perms
		if d != xen.Dom0 && perms[0].Dom != d {
			perms = append([]xenstore.Perm{{Dom: d, Access: perms[0].Access}}, perms[1:]...)
		}
		c := &node{perms: perms}
		t.account(perms[0].Dom, 1)
		if n.children == nil {
			n.children = make(map[string]*node)
		}
		n.children[comps[i]] = c
		t.bump(n)
		n = c
	}
	return n, nil
}

func (t *tree) account(owner xen.DomID, delta int) {
	if owner != xen.Dom0 {
		t.owned[owner] += delta
	}
}

func (t *tree) write(d xen.DomID, path string, value []byte) error {
	n := t.touch(path)
	if n == nil {
		var err error
		if n, err = t.create(d, path); err != nil {
			return err
		}
	} else if !n.perm(d).CanWrite() {
		return xenstore.EACCES
	}
	n.value = value
	t.bump(n)
	t.notify(change{path: path, node: n})
	return nil
}

func (t *tree) mkdir(d xen.DomID, path string) error {
	if t.touch(path) != nil {
		return nil
	}
	n, err := t.create(d, path)
	if err != nil {
		return err
	}
	t.notify(change{path: path, node: n})
	return nil
}

func (t *tree) rm(d xen.DomID, path string) error {
	if path == "/" {
		return xenstore.EINVAL
	}
	n := t.touch(path)
	parent := t.touch(parentOf(path))
	if n == nil {
		if parent == nil {
			return xenstore.ENOENT
		}
		return nil
	}
	if !n.perm(d).CanWrite() {
		return xenstore.EACCES
	}
	t.unaccount(n)
	comps := split(path)
	delete(parent.children, comps[len(comps)-1])
	t.bump(parent)
	t.notify(change{path: path, node: n, removed: true})
	return nil
}

func (t *tree) unaccount(n *node) {
	t.account(n.perms[0].Dom, -1)
	for _, c := range n.children {
		t.unaccount(c)
	}
}

// setPerms replaces the ACL; only dom0 may hand a node to another owner.
func (t *tree) setPerms(d xen.DomID, path string, perms []xenstore.Perm) error {
	n := t.touch(path)
	if n == nil {
		return xenstore.ENOENT
	}
	if !n.perm(d).CanWrite() {
		return xenstore.EACCES
	}
	if d != xen.Dom0 && perms[0].Dom != n.perms[0].Dom {
		return xenstore.EPERM
	}
	if perms[0].Dom != n.perms[0].Dom {
		if perms[0].Dom != xen.Dom0 && t.owned[perms[0].Dom] >= t.quota {
			return xenstore.ENOSPC
		}
		t.account(n.perms[0].Dom, -1)
		t.account(perms[0].Dom, 1)
	}
	n.perms = perms
	t.bump(n)
	t.notify(change{path: path, node: n})
	return nil
}

// domainPath is the home of domain d.
func domainPath(d xen.DomID) string { return "/local/domain/" + strconv.Itoa(int(d)) }
