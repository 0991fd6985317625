//go:build nocv

package host

import (
	"errors"

	"github.com/visionslice/visionslice/runtime/repository"
	"github.com/visionslice/visionslice/runtime/tensor"
)

// A worker built with the nocv tag does not link OpenCV (for hosts without
// it, e.g. to measure the runtime alone); models with image inputs fail to
// load in it.
func newImagePreprocessor(*repository.Preprocessing) (preprocessor, tensor.DataType, error) {
	return nil, "", errors.New("image preprocessing is unavailable: this worker was built with the nocv tag, without OpenCV")
}

func badImage(error) bool { return false }
