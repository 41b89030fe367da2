// Validates custom resources against the published CRD schemas of the versions pinned in package.json.
//
//   npm ci --prefix tests/data/crd-validators          (once; .ci/run does it)
//   node tests/data/crd-validators/validate.mjs < objects.json
//
// stdin: a JSON array of Kubernetes objects. stdout: a JSON array, one {kind, name, error} per object,
// error null when the object is valid. An object of a kind this file has no schema for is an error.
// tests/test_k8s.py runs it on every custom resource that `kubectl kustomize` renders.
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";

const MODELS = {
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
  "monitoring.coreos.com/v1/PrometheusRule": PrometheusRule,
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
};

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const results = JSON.parse(Buffer.concat(chunks).toString("utf8")).map((object) => {
  const Model = MODELS[`${object.apiVersion}/${object.kind}`];
  let error = null;
  if (!Model) {
    error = `no published schema here for ${object.apiVersion} ${object.kind}`;
  } else {
    try {
      new Model(object).validate();
    } catch (exc) {
      error = String(exc.message ?? exc);
    }
  }
  return { kind: object.kind, name: object.metadata?.name ?? null, error };
});
process.stdout.write(JSON.stringify(results) + "\n");
