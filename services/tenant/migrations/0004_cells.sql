-- Placement: the database cell holding each tenant's rows in the sites, features and audit
-- services (services/runtime/cells.py). The registry itself stays in the home cell. NULL is
-- the home cell: the tenants created before cells existed, which is where their rows are.
ALTER TABLE tenants ADD COLUMN cell text;
