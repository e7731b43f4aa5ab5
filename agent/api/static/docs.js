// The /docs page's own script (a file, not inline: the page's CSP allows scripts from this
// origin only). Swagger UI reads /openapi.json; "Try it out" requests carry the vendor
// Accept header unless the Authorize dialog set one, so only the token has to be entered.
"use strict";
(function () {
  var root = document.getElementById("swagger-ui");
  var vendor = root.getAttribute("data-vendor");
  window.ui = SwaggerUIBundle({
    url: root.getAttribute("data-spec"),
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    requestInterceptor: function (req) {
      var accept = req.headers.Accept || req.headers.accept || "";
      if (req.url.indexOf("/openapi.json") === -1 && accept.toLowerCase().indexOf(vendor) === -1) {
        req.headers.Accept = vendor;
      }
      return req;
    },
  });
})();
