package xenstore

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// ErrMalformed reports a payload that does not follow the encoding its
// message type requires.
var ErrMalformed = errors.New("xenstore: malformed payload")

// AppendStrings appends each string followed by a NUL, the encoding of
// request arguments, directory listings and permission lists.
func AppendStrings(dst []byte, ss ...string) []byte {
	for _, s := range ss {
		dst = append(append(dst, s...), 0)
	}
	return dst
}

// Strings splits a payload of NUL-terminated strings. An empty payload is an
// empty list; a payload whose last string lacks its NUL is malformed.
func Strings(p []byte) ([]string, error) {
	if len(p) == 0 {
		return nil, nil
	}
	if p[len(p)-1] != 0 {
		return nil, fmt.Errorf("%w: list not NUL-terminated", ErrMalformed)
	}
	return strings.Split(string(p[:len(p)-1]), "\x00"), nil
}

// FirstString returns the payload up to its first NUL, which must exist.
func FirstString(p []byte) (string, error) {
	i := bytes.IndexByte(p, 0)
	if i < 0 {
		return "", fmt.Errorf("%w: string not NUL-terminated", ErrMalformed)
	}
	return string(p[:i]), nil
}

// ParseWatchEvent decodes a WATCH_EVENT payload "path\0token\0". Some servers
// append further fields; they are ignored.
func ParseWatchEvent(p []byte) (path, token string, err error) {
	ss, err := Strings(p)
	if err != nil {
		return "", "", err
	}
	if len(ss) < 2 {
		return "", "", fmt.Errorf("%w: watch event with %d fields", ErrMalformed, len(ss))
	}
	return ss[0], ss[1], nil
}

// Access is a permission letter.
type Access byte

const (
	AccessNone  Access = 'n'
	AccessRead  Access = 'r'
	AccessWrite Access = 'w'
	AccessBoth  Access = 'b'
)

// CanRead reports whether a grants reading.
func (a Access) CanRead() bool { return a == AccessRead || a == AccessBoth }

// CanWrite reports whether a grants writing.
func (a Access) CanWrite() bool { return a == AccessWrite || a == AccessBoth }

// Perm is one entry of a node's permission list. The first entry of a list
// names the owner, and its access is the default for domains not listed.
type Perm struct {
	Dom    DomID
	Access Access
}

func (p Perm) String() string { return string(p.Access) + strconv.Itoa(int(p.Dom)) }

// ParsePerm decodes one permission string such as "r5".
func ParsePerm(s string) (Perm, error) {
	if len(s) < 2 {
		return Perm{}, fmt.Errorf("%w: permission %q", ErrMalformed, s)
	}
	a := Access(s[0])
	switch a {
	case AccessNone, AccessRead, AccessWrite, AccessBoth:
	default:
		return Perm{}, fmt.Errorf("%w: permission %q has unknown access", ErrMalformed, s)
	}
	d, err := strconv.ParseUint(s[1:], 10, 16)
	if err != nil || s[1] == '+' {
		return Perm{}, fmt.Errorf("%w: permission %q has bad domain id", ErrMalformed, s)
	}
	return Perm{Dom: DomID(d), Access: a}, nil
}

// MaxPerms bounds a permission list (xenstored limits ACLs similarly).
const MaxPerms = 256

// ParsePerms decodes a GET_PERMS reply or the tail of a SET_PERMS request.
func ParsePerms(ss []string) ([]Perm, error) {
	if len(ss) == 0 {
		return nil, fmt.Errorf("%w: empty permission list", ErrMalformed)
	}
	if len(ss) > MaxPerms {
		return nil, fmt.Errorf("%w: %d permissions", ErrMalformed, len(ss))
	}
	ps := make([]Perm, len(ss))
	for i, s := range ss {
		p, err := ParsePerm(s)
		if err != nil {
			return nil, err
		}
		ps[i] = p
	}
	return ps, nil
}

// AccessFor returns the access that perms give domain d, which is neither
// privileged nor the owner: its own entry if listed, else the default.
func AccessFor(perms []Perm, d DomID) Access {
	if len(perms) == 0 {
		return AccessNone
	}
	for _, p := range perms[1:] {
		if p.Dom == d {
			return p.Access
		}
	}
	return perms[0].Access
}

// Errno is an error name carried by an ERROR reply, e.g. "ENOENT".
type Errno string

func (e Errno) Error() string { return string(e) }

// Errors a server may return (xs_wire.h xsd_errors).
const (
	EINVAL    Errno = "EINVAL"
	EACCES    Errno = "EACCES"
	EEXIST    Errno = "EEXIST"
	EISDIR    Errno = "EISDIR"
	ENOENT    Errno = "ENOENT"
	ENOMEM    Errno = "ENOMEM"
	ENOSPC    Errno = "ENOSPC"
	EIO       Errno = "EIO"
	ENOTEMPTY Errno = "ENOTEMPTY"
	ENOSYS    Errno = "ENOSYS"
	EROFS     Errno = "EROFS"
	EBUSY     Errno = "EBUSY"
	EAGAIN    Errno = "EAGAIN"
	EISCONN   Errno = "EISCONN"
	E2BIG     Errno = "E2BIG"
	EPERM     Errno = "EPERM"
)

// maxErrnoLen bounds the error name kept from a hostile reply.
const maxErrnoLen = 32

// ParseError decodes an ERROR payload into its Errno.
func ParseError(p []byte) (Errno, error) {
	s, err := FirstString(p)
	if err != nil {
		return "", err
	}
	if s == "" || len(s) > maxErrnoLen {
		return "", fmt.Errorf("%w: error name of %d bytes", ErrMalformed, len(s))
	}
	return Errno(s), nil
}
