package qubesdb

import (
	"fmt"
	"strings"
)

// CheckPath reports whether p may appear in a header (verify_path in the
// reference daemon): at most MaxPathLen bytes of a-z A-Z 0-9 - _ / . : @,
// and no leading '-'. The empty path and a trailing '/' pass; whether a
// command accepts them is up to the command.
func CheckPath(p string) error {
	if len(p) > MaxPathLen {
		return fmt.Errorf("%w: path of %d bytes, limit %d", ErrInvalid, len(p), MaxPathLen)
	}
	for i := 0; i < len(p); i++ {
		c := p[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case c == '_', c == '/', c == '.', c == ':', c == '@':
		case c == '-' && i > 0:
		default:
			return fmt.Errorf("%w: path %q has byte %#02x at %d", ErrInvalid, p, c, i)
		}
	}
	return nil
}

// CheckKey reports whether p may name a stored entry: a valid path that
// starts with '/' and does not end with '/'.
func CheckKey(p string) error {
	if err := CheckPath(p); err != nil {
		return err
	}
	if !strings.HasPrefix(p, "/") || strings.HasSuffix(p, "/") {
		return fmt.Errorf("%w: key %q must start and must not end with '/'", ErrInvalid, p)
	}
	return nil
}

// CheckRmPath reports whether p may be removed: a valid path starting with
// '/'; a trailing '/' selects the whole subtree.
func CheckRmPath(p string) error {
	if err := CheckPath(p); err != nil {
		return err
	}
	if !strings.HasPrefix(p, "/") {
		return fmt.Errorf("%w: RM path %q must start with '/'", ErrInvalid, p)
	}
	return nil
}

// CheckValue reports whether v may be stored: at most MaxValueLen bytes and
// no NUL.
func CheckValue[V ~string | ~[]byte](v V) error {
	if len(v) > MaxValueLen {
		return fmt.Errorf("%w: value of %d bytes, limit %d", ErrInvalid, len(v), MaxValueLen)
	}
	for i := 0; i < len(v); i++ {
		if v[i] == 0 {
			return fmt.Errorf("%w: value has a NUL byte at %d", ErrInvalid, i)
		}
	}
	return nil
}

// CheckVchan validates a message received on the inter-daemon vchan: only
// MULTIREAD, WRITE, RM, RESP_OK, RESP_ERROR and RESP_MULTIREAD may appear
// there, with a valid path, and only WRITE and RESP_MULTIREAD carry data.
// Whether the message is expected at this point of the exchange is for the
// caller to decide.
func CheckVchan(m Message) error {
	if err := CheckPath(m.Path); err != nil {
		return fmt.Errorf("%v: %w", m.Type, err)
	}
	switch m.Type {
	case CmdWrite:
		if err := CheckKey(m.Path); err != nil {
			return fmt.Errorf("WRITE: %w", err)
		}
		if err := CheckValue(m.Data); err != nil {
			return fmt.Errorf("WRITE %q: %w", m.Path, err)
		}
		return nil
	case RespMultiread:
		if m.Path == "" {
			return checkNoData(m)
		}
		if err := CheckKey(m.Path); err != nil {
			return fmt.Errorf("RESP_MULTIREAD: %w", err)
		}
		if err := CheckValue(m.Data); err != nil {
			return fmt.Errorf("RESP_MULTIREAD %q: %w", m.Path, err)
		}
		return nil
	case CmdRm:
		if err := CheckRmPath(m.Path); err != nil {
			return err
		}
		return checkNoData(m)
	case CmdMultiread, RespOK, RespError:
		return checkNoData(m)
	default:
		return fmt.Errorf("%w: %v is not allowed on the vchan", ErrInvalid, m.Type)
	}
}

func checkNoData(m Message) error {
	if len(m.Data) != 0 {
		return fmt.Errorf("%w: %v %q carries %d data bytes", ErrInvalid, m.Type, m.Path, len(m.Data))
	}
	return nil
}
