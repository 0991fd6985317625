package cv

import (
	"errors"
	"fmt"
	"image"
	"runtime"
	"sync"
	"sync/atomic"

	"gocv.io/x/gocv"

	"github.com/visionslice/visionslice/runtime/tensor"
)

// ErrClosed is returned by a Preprocessor after Close.
var ErrClosed = errors.New("preprocessor is closed")

// Preprocessor turns encoded images into tensor rows with OpenCV. It is safe
// for concurrent use; it keeps a bounded pool of resize buffers (Mats),
// which Close releases. Every Mat it makes is closed on every path.
type Preprocessor struct {
	p    Params
	w    *writer
	pool chan *gocv.Mat
	// live counts Mats made and not yet closed, for leak checks.
	live atomic.Int64

	mu     sync.RWMutex
	closed bool
}

// NewPreprocessor checks p and returns a Preprocessor that keeps up to
// poolSize resize buffers (0: GOMAXPROCS).
func NewPreprocessor(p Params, poolSize int) (*Preprocessor, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	if poolSize <= 0 {
		poolSize = runtime.GOMAXPROCS(0)
	}
	return &Preprocessor{p: p, w: newWriter(p), pool: make(chan *gocv.Mat, poolSize)}, nil
}

// Params returns the parameters.
func (pp *Preprocessor) Params() Params { return pp.p }

// LiveMats is the number of Mats made and not closed (the pooled ones
// included); 0 after Close.
func (pp *Preprocessor) LiveMats() int64 { return pp.live.Load() }

// Close releases the pooled Mats. Calls in flight finish first.
func (pp *Preprocessor) Close() {
	pp.mu.Lock()
	defer pp.mu.Unlock()
	if pp.closed {
		return
	}
	pp.closed = true
	for {
		select {
		case m := <-pp.pool:
			pp.closeMat(m)
		default:
			return
		}
	}
}

func (pp *Preprocessor) closeMat(m *gocv.Mat) {
	m.Close()
	pp.live.Add(-1)
}

func (pp *Preprocessor) getMat() *gocv.Mat {
	select {
	case m := <-pp.pool:
		return m
	default:
		m := gocv.NewMat()
		pp.live.Add(1)
		return &m
	}
}

func (pp *Preprocessor) putMat(m *gocv.Mat) {
	select {
	case pp.pool <- m:
	default:
		pp.closeMat(m)
	}
}

// Into preprocesses one encoded image into dst, which must be RowBytes long.
func (pp *Preprocessor) Into(dst []byte, img []byte) error {
	if len(dst) != pp.p.RowBytes() {
		return fmt.Errorf("destination holds %d bytes, one image needs %d", len(dst), pp.p.RowBytes())
	}
	pp.mu.RLock()
	defer pp.mu.RUnlock()
	if pp.closed {
		return ErrClosed
	}
	hd, err := ReadHeader(img, pp.p.MaxPixels)
	if err != nil {
		return err
	}
	flag := gocv.IMReadColor
	switch pp.p.reduction(hd) {
	case 2:
		flag = gocv.IMReadReducedColor2
	case 4:
		flag = gocv.IMReadReducedColor4
	case 8:
		flag = gocv.IMReadReducedColor8
	}
	decoded, err := gocv.IMDecode(img, flag)
	if err != nil {
		return fmt.Errorf("%w: decode %s: %w", ErrBadImage, hd.Format, err)
	}
	pp.live.Add(1)
	defer pp.closeMat(&decoded)
	if decoded.Empty() || decoded.Channels() != 3 {
		return fmt.Errorf("%w: %s of %dx%d could not be decoded", ErrBadImage, hd.Format, hd.Width, hd.Height)
	}
	g := pp.p.geometry(decoded.Cols(), decoded.Rows())
	resized := pp.getMat()
	defer pp.putMat(resized)
	src := &decoded
	if decoded.Cols() != g.w || decoded.Rows() != g.h {
		gocv.Resize(decoded, resized, image.Pt(g.w, g.h), 0, 0, gocv.InterpolationLinear)
		src = resized
	}
	pix, err := src.DataPtrUint8()
	if err != nil {
		return fmt.Errorf("read resized pixels: %w", err)
	}
	chans := [3]int{0, 1, 2} // OpenCV decodes to B, G, R
	if pp.p.RGB {
		chans = [3]int{2, 1, 0}
	}
	pp.w.write(dst, source{pix: pix, stride: src.Step(), bpp: 3, chans: chans, g: g})
	return nil
}

// Batch preprocesses images, one row each, into one tensor named name,
// working on up to GOMAXPROCS images at once. The error names the first
// image that failed by its index.
func (pp *Preprocessor) Batch(name string, images [][]byte) (tensor.Tensor, error) {
	return batch(name, &pp.p, images, pp.Into)
}

func batch(name string, p *Params, images [][]byte, into func(dst, img []byte) error) (tensor.Tensor, error) {
	if len(images) == 0 {
		return tensor.Tensor{}, fmt.Errorf("%w: no images", ErrBadImage)
	}
	row := p.RowBytes()
	data := make([]byte, row*len(images))
	errs := make([]error, len(images))
	if len(images) == 1 {
		errs[0] = into(data, images[0])
	} else {
		var wg sync.WaitGroup
		sem := make(chan struct{}, runtime.GOMAXPROCS(0))
		for i := range images {
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				errs[i] = into(data[i*row:(i+1)*row], images[i])
			}()
		}
		wg.Wait()
	}
	for i, err := range errs {
		if err != nil {
			return tensor.Tensor{}, fmt.Errorf("image %d: %w", i, err)
		}
	}
	return tensor.Tensor{Name: name, Datatype: p.Datatype, Shape: p.Shape(len(images)), Data: data}, nil
}
