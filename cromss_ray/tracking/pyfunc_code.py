"""The CromSS pyfunc (pretrained and fine-tuned alike) as an MLflow "model from code": MLflow runs this file to obtain the model.

:func:`cromss_ray.tracking.pyfunc.log_registered_model` passes this file's path as
``python_model``, so the model is stored as source rather than as a pickle. When the
model is loaded, MLflow executes the stored copy, with the logged ``cromss_ray``
package on the path, and takes the object handed to :func:`mlflow.models.set_model`.
"""

from mlflow.models import set_model

from cromss_ray.tracking.pyfunc import CromSSPyfunc

set_model(CromSSPyfunc())
