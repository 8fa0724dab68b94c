package timer

// The CBOR (RFC 8949) this API needs, and nothing more: maps with text keys,
// arrays, text, 64-bit integers, booleans, null and floats. Writing is
// deterministic (shortest heads, fields in declaration order); reading is
// strict: definite lengths only, no tags, integers within int64, valid UTF-8,
// no duplicate keys and no bytes after the item.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"unicode/utf8"
)

const maxDepth = 64 // nesting this API never comes near; bounds the reader's stack

type encoder struct {
	buf []byte
	err error
}

func (e *encoder) head(major byte, n uint64) {
	switch {
	case n < 24:
		e.buf = append(e.buf, major<<5|byte(n))
	case n <= math.MaxUint8:
		e.buf = append(e.buf, major<<5|24, byte(n))
	case n <= math.MaxUint16:
		e.buf = binary.BigEndian.AppendUint16(append(e.buf, major<<5|25), uint16(n))
	case n <= math.MaxUint32:
		e.buf = binary.BigEndian.AppendUint32(append(e.buf, major<<5|26), uint32(n))
	default:
		e.buf = binary.BigEndian.AppendUint64(append(e.buf, major<<5|27), n)
	}
}

func (e *encoder) int(v int64) {
	if v >= 0 {
		e.head(0, uint64(v))
	} else {
		e.head(1, uint64(-(v + 1)))
	}
}

func (e *encoder) text(s string) {
	if !utf8.ValidString(s) && e.err == nil {
		e.err = fmt.Errorf("text %q is not valid UTF-8", s)
	}
	e.head(3, uint64(len(s)))
	e.buf = append(e.buf, s...)
}

func (e *encoder) bool(v bool) {
	if v {
		e.buf = append(e.buf, 0xf5)
	} else {
		e.buf = append(e.buf, 0xf4)
	}
}

func (e *encoder) null() { e.buf = append(e.buf, 0xf6) }

func (e *encoder) float(v float64) {
	e.buf = binary.BigEndian.AppendUint64(append(e.buf, 0xfb), math.Float64bits(v))
}

func (e *encoder) array(n int)  { e.head(4, uint64(n)) }
func (e *encoder) object(n int) { e.head(5, uint64(n)) }

var errTruncated = errors.New("the item ends early")

type decoder struct {
	data  []byte
	pos   int
	depth int
}

// decodeItem reads exactly one CBOR item from data into nil, bool, int64,
// float64, string, []byte, []any or map[string]any.
func decodeItem(data []byte) (any, error) {
	d := decoder{data: data}
	v, err := d.item()
	if err != nil {
		return nil, err
	}
	if d.pos != len(data) {
		return nil, fmt.Errorf("%d bytes after the item", len(data)-d.pos)
	}
	return v, nil
}

func (d *decoder) take(n uint64) ([]byte, error) {
	if n > uint64(len(d.data)-d.pos) {
		return nil, errTruncated
	}
	b := d.data[d.pos : d.pos+int(n)]
	d.pos += int(n)
	return b, nil
}

func (d *decoder) item() (any, error) {
	if d.depth >= maxDepth {
		return nil, fmt.Errorf("nested deeper than %d", maxDepth)
	}
	first, err := d.take(1)
	if err != nil {
		return nil, err
	}
	major, info := first[0]>>5, first[0]&31
	if info == 31 {
		return nil, errors.New("indefinite lengths are not used")
	}
	if info > 27 {
		return nil, fmt.Errorf("malformed initial byte 0x%02x", first[0])
	}
	arg := uint64(info)
	if info >= 24 {
		b, err := d.take(1 << (info - 24))
		if err != nil {
			return nil, err
		}
		arg = 0
		for _, c := range b {
			arg = arg<<8 | uint64(c)
		}
	}
	switch major {
	case 0:
		if arg > math.MaxInt64 {
			return nil, fmt.Errorf("integer %d is beyond int64", arg)
		}
		return int64(arg), nil
	case 1:
		if arg > math.MaxInt64 {
			return nil, fmt.Errorf("integer -1-%d is beyond int64", arg)
		}
		return -1 - int64(arg), nil
	case 2, 3:
		b, err := d.take(arg)
		if err != nil {
			return nil, err
		}
		if major == 2 {
			return append([]byte(nil), b...), nil
		}
		if !utf8.Valid(b) {
			return nil, errors.New("text is not valid UTF-8")
		}
		return string(b), nil
	case 4, 5:
		if arg > uint64(len(d.data)-d.pos) { // every member takes a byte at least
			return nil, errTruncated
		}
		d.depth++
		defer func() { d.depth-- }()
		if major == 4 {
			items := make([]any, 0, arg)
			for i := uint64(0); i < arg; i++ {
				v, err := d.item()
				if err != nil {
					return nil, err
				}
				items = append(items, v)
			}
			return items, nil
		}
		members := make(map[string]any, arg)
		for i := uint64(0); i < arg; i++ {
			k, err := d.item()
			if err != nil {
				return nil, err
			}
			key, ok := k.(string)
			if !ok {
				return nil, fmt.Errorf("a map key is %s, not text", kind(k))
			}
			if _, dup := members[key]; dup {
				return nil, fmt.Errorf("duplicate key %q", key)
			}
			if members[key], err = d.item(); err != nil {
				return nil, err
			}
		}
		return members, nil
	case 6:
		return nil, errors.New("CBOR tags are not used")
	}
	switch info {
	case 20, 21:
		return info == 21, nil
	case 22:
		return nil, nil
	case 25:
		return halfFloat(uint16(arg)), nil
	case 26:
		return float64(math.Float32frombits(uint32(arg))), nil
	case 27:
		return math.Float64frombits(arg), nil
	}
	return nil, fmt.Errorf("simple value %d is not used", arg)
}

func halfFloat(h uint16) float64 {
	exp, frac := int(h>>10&0x1f), float64(h&0x3ff)
	var v float64
	switch exp {
	case 0:
		v = math.Ldexp(frac, -24)
	case 31:
		v = math.Inf(1)
		if frac != 0 {
			v = math.NaN()
		}
	default:
		v = math.Ldexp(frac+1024, exp-25)
	}
	if h&0x8000 != 0 {
		return -v
	}
	return v
}

// kind names a decoded item's CBOR type, for error messages.
func kind(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case bool:
		return "a boolean"
	case int64:
		return "an integer"
	case float64:
		return "a float"
	case string:
		return "text"
	case []byte:
		return "bytes"
	case []any:
		return "an array"
	case map[string]any:
		return "a map"
	}
	return fmt.Sprintf("%T", v)
}

// The readers below turn a decoded item into a Go value of the API's types,
// or say which field (path) held what instead.

type fieldError struct {
	path, reason string
}

func (e *fieldError) Error() string {
	if e.path == "" {
		return e.reason
	}
	return e.path + ": " + e.reason
}

func wrong(path, want string, got any) error {
	return &fieldError{path, fmt.Sprintf("expected %s, got %s", want, kind(got))}
}

func join(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}

func readText(v any, path string) (string, error) {
	s, ok := v.(string)
	if !ok {
		return "", wrong(path, "text", v)
	}
	return s, nil
}

func readInt(v any, path string) (int64, error) {
	i, ok := v.(int64)
	if !ok {
		return 0, wrong(path, "an integer", v)
	}
	return i, nil
}

func readBool(v any, path string) (bool, error) {
	b, ok := v.(bool)
	if !ok {
		return false, wrong(path, "a boolean", v)
	}
	return b, nil
}

func readFloat(v any, path string) (float64, error) {
	switch f := v.(type) {
	case float64:
		return f, nil
	case int64:
		return float64(f), nil
	}
	return 0, wrong(path, "a number", v)
}

func readObject(v any, path string) (map[string]any, error) {
	m, ok := v.(map[string]any)
	if !ok {
		return nil, wrong(path, "a map", v)
	}
	return m, nil
}

func readList[T any](v any, path string, read func(any, string) (T, error)) ([]T, error) {
	items, ok := v.([]any)
	if !ok {
		return nil, wrong(path, "an array", v)
	}
	out := make([]T, len(items))
	for i, item := range items {
		var err error
		if out[i], err = read(item, fmt.Sprintf("%s[%d]", path, i)); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// readOptional reads a member that may be absent or null into a pointer.
func readOptional[T any](m map[string]any, name, path string, read func(any, string) (T, error)) (*T, error) {
	v, ok := m[name]
	if !ok || v == nil {
		return nil, nil
	}
	out, err := read(v, join(path, name))
	if err != nil {
		return nil, err
	}
	return &out, nil
}

// readRequired reads a member that must be present.
func readRequired[T any](m map[string]any, name, path string, read func(any, string) (T, error)) (T, error) {
	v, ok := m[name]
	if !ok {
		var zero T
		return zero, &fieldError{join(path, name), "missing"}
	}
	return read(v, join(path, name))
}

// readNullable reads a member that must be present but may be null.
func readNullable[T any](m map[string]any, name, path string, read func(any, string) (T, error)) (*T, error) {
	if _, ok := m[name]; !ok {
		return nil, &fieldError{join(path, name), "missing"}
	}
	return readOptional(m, name, path, read)
}
