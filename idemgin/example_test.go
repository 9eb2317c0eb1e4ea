package idemgin_test

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"

	"github.com/gin-gonic/gin"

	"github.com/f8e778d0/idempotency"
	"github.com/f8e778d0/idempotency/idemgin"
)

// The middleware goes after authentication, which keeps the principal in
// the gin context; keys are scoped by it. A retry with the same key gets
// the stored response, and the handler runs once.
func ExampleNew() {
	r := gin.New()
	r.Use(gin.Recovery())
	r.Use(func(c *gin.Context) { c.Set("user", c.GetHeader("X-User")) }) // authentication
	r.Use(idemgin.New(idempotency.Config{RequireKey: true},
		idemgin.WithKeyScope(func(c *gin.Context) string { return c.GetString("user") })))

	orders := 0
	r.POST("/orders", func(c *gin.Context) {
		orders++
		c.JSON(http.StatusCreated, gin.H{"id": orders})
	})

	for range 2 {
		req := httptest.NewRequest(http.MethodPost, "/orders", strings.NewReader(`{"item":"book"}`))
		req.Header.Set("X-User", "alice")
		req.Header.Set("Idempotency-Key", "8e03978e-40d5-43e8-bc93-6894a57f9324")
		w := httptest.NewRecorder()
		r.ServeHTTP(w, req)
		fmt.Println(w.Code, w.Body.String(), "replayed:", w.Header().Get(idempotency.ReplayedHeader) == "true")
	}
	// Output:
	// 201 {"id":1} replayed: false
	// 201 {"id":1} replayed: true
}
