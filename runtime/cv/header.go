package cv

import (
	"bytes"
	"errors"
	"fmt"
	"image/jpeg"
	"image/png"
)

// ErrBadImage wraps every error about an image a client sent: not JPEG or
// PNG, corrupt, truncated or too large.
var ErrBadImage = errors.New("bad image")

// Header is what an image declares about itself before its pixels.
type Header struct {
	// Format is "jpeg" or "png".
	Format string
	Width  int
	Height int
}

var (
	jpegMagic = []byte{0xFF, 0xD8, 0xFF}
	pngMagic  = []byte("\x89PNG\r\n\x1a\n")
	jpegEOI   = []byte{0xFF, 0xD9}
	pngIEND   = []byte("IEND")
)

// ReadHeader identifies a JPEG or PNG image and reads its declared size
// (JPEG SOF, PNG IHDR) without decoding pixels. It also checks that the
// image is complete (a JPEG ends with EOI, a PNG with IEND): a truncated
// image would otherwise decode into partly grey pixels without an error.
// maxPixels > 0 bounds width*height, the guard against decompression bombs.
func ReadHeader(data []byte, maxPixels int64) (Header, error) {
	var h Header
	switch {
	case bytes.HasPrefix(data, jpegMagic):
		c, err := jpeg.DecodeConfig(bytes.NewReader(data))
		if err != nil {
			return h, fmt.Errorf("%w: jpeg header: %w", ErrBadImage, err)
		}
		h = Header{Format: "jpeg", Width: c.Width, Height: c.Height}
		// Bytes after EOI are tolerated (some cameras append data); an image
		// that never reaches EOI is truncated.
		if bytes.LastIndex(data, jpegEOI) < 4 {
			return h, fmt.Errorf("%w: jpeg is truncated (no end-of-image marker)", ErrBadImage)
		}
	case bytes.HasPrefix(data, pngMagic):
		c, err := png.DecodeConfig(bytes.NewReader(data))
		if err != nil {
			return h, fmt.Errorf("%w: png header: %w", ErrBadImage, err)
		}
		h = Header{Format: "png", Width: c.Width, Height: c.Height}
		// The IEND chunk: length 0, type, CRC; 12 bytes at the end.
		if len(data) < 12 || !bytes.Equal(data[len(data)-8:len(data)-4], pngIEND) {
			return h, fmt.Errorf("%w: png is truncated (no IEND chunk at the end)", ErrBadImage)
		}
	case len(data) == 0:
		return h, fmt.Errorf("%w: empty", ErrBadImage)
	default:
		return h, fmt.Errorf("%w: not a JPEG or PNG image", ErrBadImage)
	}
	if h.Width <= 0 || h.Height <= 0 {
		return h, fmt.Errorf("%w: %s declares %dx%d pixels", ErrBadImage, h.Format, h.Width, h.Height)
	}
	if maxPixels > 0 && int64(h.Width)*int64(h.Height) > maxPixels {
		return h, fmt.Errorf("%w: %s declares %dx%d pixels, more than the limit of %d", ErrBadImage, h.Format, h.Width, h.Height, maxPixels)
	}
	return h, nil
}
