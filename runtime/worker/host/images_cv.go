//go:build !nocv

package host

import (
	"errors"

	"github.com/visionslice/visionslice/runtime/cv"
	"github.com/visionslice/visionslice/runtime/repository"
	"github.com/visionslice/visionslice/runtime/tensor"
)

func newImagePreprocessor(spec *repository.Preprocessing) (preprocessor, tensor.DataType, error) {
	p := cv.ParamsFrom(spec)
	pp, err := cv.NewPreprocessor(p, 0)
	if err != nil {
		return nil, "", err
	}
	return cvPreprocessor{pp}, p.Datatype, nil
}

type cvPreprocessor struct{ *cv.Preprocessor }

func (c cvPreprocessor) Shape(n int) []int64 { return c.Params().Shape(n) }

func badImage(err error) bool { return errors.Is(err, cv.ErrBadImage) }
